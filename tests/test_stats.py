import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from balancedmix import stats

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


def grads_strategy(max_k=6, max_d=40):
    return st.integers(1, max_k).flatmap(
        lambda k: st.integers(1, max_d).flatmap(lambda d: arrays(np.float64, (k, d), elements=finite))
    )


@given(grads_strategy())
def test_gram_matches_explicit_dots(g):
    gram = stats.gram_matrix([torch.from_numpy(row) for row in g])
    ref = np.array([[float(np.dot(a, b)) for b in g] for a in g])
    np.testing.assert_allclose(gram.numpy(), ref, rtol=1e-9, atol=1e-6)


def test_gram_accepts_per_parameter_lists_and_checks_sizes():
    a = [torch.ones(2, 2), torch.ones(3)]
    b = [torch.zeros(2, 2), 2 * torch.ones(3)]
    gram = stats.gram_matrix([a, b])
    assert gram.tolist() == [[7.0, 6.0], [6.0, 12.0]]
    with pytest.raises(ValueError, match="different numbers"):
        stats.gram_matrix([torch.ones(3), torch.ones(4)])


@given(grads_strategy())
def test_shares_sum_to_one_and_match_definition(g):
    gt = torch.from_numpy(g)
    total = gt.sum(0)
    gram = stats.gram_matrix(list(gt))
    shares = stats.update_shares(gram)
    tsq = float(total @ total)
    if tsq <= 1e-9 * max(1.0, float((gt * gt).sum())):
        return  # degenerate: G ~ 0
    ref = (gt @ total) / tsq
    np.testing.assert_allclose(shares.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    assert math.isclose(float(shares.sum()), 1.0, rel_tol=1e-6)


@given(grads_strategy(), st.lists(st.floats(-3, 3), min_size=6, max_size=6))
def test_weighted_shares_and_combined_norm(g, c):
    gt = torch.from_numpy(g)
    coef = torch.tensor(c[: gt.shape[0]], dtype=torch.float64)
    gram = stats.gram_matrix(list(gt))
    update = (coef[:, None] * gt).sum(0)
    assert math.isclose(float(stats.combined_sqnorm(gram, coef)), float(update @ update), rel_tol=1e-7, abs_tol=1e-5)
    usq = float(update @ update)
    if usq > 1e-6:
        ref = coef * (gt @ update) / usq
        np.testing.assert_allclose(stats.update_shares(gram, coef).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_cosines_zero_gradient_and_range():
    gram = stats.gram_matrix([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([-2.0, 0.0])])
    cos = stats.cosines(gram)
    assert cos[0, 1] == 0 and cos[0, 2] == -1 and torch.all(torch.diagonal(cos) == 1)
    assert stats.update_shares(torch.zeros(2, 2)).tolist() == [0.0, 0.0]


def test_split_half_estimator_is_unbiased_and_raw_is_not():
    # micro-batch gradients g_i = mu + noise; 2 halves of 3 micro-batches each
    gen = torch.Generator().manual_seed(0)
    d, n_a, n_b, draws, sigma = 50, 3, 3, 4000, 1.0
    mu = torch.full((d,), 0.1, dtype=torch.float64)
    true = float(mu @ mu) * (n_a + n_b) ** 2  # ||E G||^2 with G = sum of 6 micro-batch grads
    est, raw, trace = [], [], []
    for _ in range(draws):
        g = mu + sigma * torch.randn(n_a + n_b, d, generator=gen, dtype=torch.float64)
        a, b = g[:n_a].sum(0), g[n_a:].sum(0)
        est.append(stats.split_half_sqnorm(float(a @ b), n_a, n_b))
        raw.append(float((a + b) @ (a + b)))
        trace.append(stats.split_half_noise_trace(float(a @ a), float(b @ b), float(a @ b), n_a, n_b))
    se = np.std(est) / math.sqrt(draws)
    assert abs(np.mean(est) - true) < 4 * se
    # the raw figure is biased up by n * tr(Sigma) = 6 * 50
    assert np.mean(raw) - true > 0.8 * (n_a + n_b) * d * sigma**2
    assert abs(np.mean(trace) - d * sigma**2) < 0.05 * d


def test_split_half_validation_and_noise_scale():
    with pytest.raises(ValueError, match="at least one"):
        stats.split_half_sqnorm(1.0, 0, 2)
    assert stats.noise_scale(3.0, 0.0) == math.inf
    assert stats.noise_scale(3.0, 1.5) == 2.0


@given(st.lists(finite, min_size=1, max_size=20), st.floats(0, 0.99))
@settings(max_examples=50)
def test_ema_matches_recursion(values, beta):
    acc = None
    ref = values[0]
    for i, v in enumerate(values):
        acc = stats.ema(acc, v, beta)
        if i:
            ref = beta * ref + (1 - beta) * v
    assert math.isclose(acc, ref, rel_tol=1e-9, abs_tol=1e-9)
    with pytest.raises(ValueError):
        stats.ema(None, 1.0, 1.0)
