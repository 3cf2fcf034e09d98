"""UPGrad's QP solver on nearly singular Grams (issue 14, item 14).

Task gradients that are linearly dependent up to float32 rounding give a Gram with condition
~1e13–1e14. The former Gram-form active-set solver cycled there, stopped at its iteration limit
(``converged=False``, logged at DEBUG only) and returned a point violating its own optimality
conditions: 16 % (first case) and 49 % (second case) off the exact update. The exact answers
below were computed from the Gram entries taken as exact numbers, by brute force over every
active set in 60-digit arithmetic (mpmath); ``test_exact_references_are_exact`` recomputes them.

Accuracy is measured on the update ``Σ c_t G_t``, in the Gram metric
``||Σ δc_t G_t|| = sqrt(δcᵀ Γ δc)``, relative to ``Σ_t ||G_t||``: near-dependent gradients make
the coefficients themselves large (~1e5) and ill-determined while the update is not.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from balancedmix import methods
from balancedmix.methods import MethodContext, UPGrad, dual_cone_weights, make_method, upgrad_weights

# 5 float32 task gradients (d = 64): three random rows and two combinations of them, each row
# perturbed by ~1e-7 relative noise, then rounded to float32; Gram accumulated in float64.
# cond(Γ) = 2.8e13. Former solver: converged=False, update 16 % (5.9e-3 of Σ||G_t||) off.
GRAM_A = [
    [0.8623567652110717, -0.03582080785706705, 0.46699918490610315, 0.24784002097881136, -0.8623567511413851],
    [-0.03582080785706705, 0.49913766201532483, -0.5170480551769912, 0.038217423047977775, 0.03582077033350045],
    [0.46699918490610315, -0.5170480551769912, 0.750547634085136, 0.08570260925324284, -0.4669991403477987],
    [0.24784002097881136, 0.038217423047977775, 0.08570260925324284, 0.7018181065107284, -0.24784008722701067],
    [-0.8623567511413851, 0.03582077033350045, -0.4669991403477987, -0.24784008722701067, 0.862356737071983],
]
EXACT_A = [47010.18250842675, 2797.578644111523, 2797.5946066311076, 0.20000004613798028, 48409.038726292754]

# Same construction, d = 16, cond(Γ) = 1.5e14. Former solver: converged=False, 49 % off.
GRAM_B = [
    [0.07233197903029971, 0.2699579328633493, 0.26020393097109173, -0.17114499262399335, 0.02528021160151938],
    [0.2699579328633493, 13.30182144674193, 4.544532856937591, -6.785889564433665, -0.025176715353422724],
    [0.26020393097109173, 4.544532856937591, 25.730911728428698, -2.4023697617680444, 0.607163001667832],
    [-0.17114499262399335, -6.785889564433665, -2.4023697617680444, 3.4785172341833115, -5.1770443691104284e-05],
    [0.02528021160151938, -0.025176715353422724, 0.607163001667832, -5.1770443691104284e-05, 0.1183641486525041],
]
EXACT_B = [365792.6790806449, 365792.7577528625, 0.2000000552317146, 731585.6590906458, 0.2]

CASES = [(GRAM_A, EXACT_A), (GRAM_B, EXACT_B)]


def exact_tol() -> float:
    """Attainable distance to the exact update, relative to Σ||G_t||: the refinement's residuals
    are in ``numpy.longdouble`` (measured worst over all 120 task orders: 4e-8 with the x87
    80-bit format, 8e-5 where it is float64)."""
    return 1e-7 if getattr(methods, "_EPS_LD", 0.0) < 1e-18 else 3e-4


def update_distance(a, b, gram: np.ndarray) -> float:
    """``||Σ (a_t − b_t) G_t||`` from the Gram."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(max(d @ gram @ d, 0.0)))


def size_of(gram: np.ndarray) -> float:
    return float(np.sqrt(np.clip(np.diagonal(gram), 0, None)).sum()) or 1.0


def assert_kkt(gram: np.ndarray, u: np.ndarray, v: np.ndarray, rel: float = 1e-9) -> None:
    """Optimality of ``v`` for ``min_{v ≥ u} vᵀ Γ v`` (the dual-cone projection of ``Σ u_t G_t``):
    ``v ≥ u``; ``<z, G_t> ≥ 0`` for every task (``z = Σ v_s G_s``); ``<z, G_t> = 0`` where
    ``v_t > u_t``. Tolerances: ``rel × ||G_t|| × Σ_s |v_s| ||G_s||`` (the rounding scale of
    ``<z, G_t>`` computed from the Gram)."""
    n = np.sqrt(np.clip(np.diagonal(gram), 0, None))
    dots = gram @ v
    tol = rel * n * (np.abs(v) @ n) + 1e-300
    assert (v >= u - 1e-12 * np.abs(u)).all(), f"v below its bound u: {v - u}"
    assert (dots >= -tol).all(), f"conflicts with a task: <z, G_t> = {dots}, tol {tol}"
    free = v > u + 1e-9 * np.abs(v) + 1e-300
    assert (np.abs(dots[free]) <= tol[free]).all(), f"not stationary on free tasks: {dots[free]} vs {tol[free]}"


# ----------------------------------------------------------------------------- regression


@pytest.mark.parametrize("case", range(len(CASES)))
def test_near_singular_gram_gives_the_exact_update(case, caplog):
    gram_l, exact = CASES[case]
    gram = np.array(gram_l)
    assert np.linalg.cond(gram) > 1e13
    with caplog.at_level(logging.DEBUG, logger="balancedmix.methods"):
        coef = upgrad_weights(torch.tensor(gram_l, dtype=torch.float64)).numpy()
    err = update_distance(coef, exact, gram)
    # former solver: 5.9e-3 (case 0) and 3.9e-2 (case 1) of Σ||G_t||
    assert err <= exact_tol() * size_of(gram), f"update {err / size_of(gram):.2e} x Σ||G_t|| off the exact answer"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_near_singular_gram_projections_meet_their_optimality_conditions(case):
    gram = np.array(CASES[case][0])
    k = len(gram)
    for i in range(k):
        u = np.zeros(k)
        u[i] = 1.0 / k
        assert_kkt(gram, u, dual_cone_weights(gram, u))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_near_singular_gram_result_does_not_depend_on_task_order(case):
    gram = np.array(CASES[case][0])
    k = len(gram)
    base = upgrad_weights(torch.from_numpy(gram)).numpy()
    for perm in itertools.islice(itertools.permutations(range(k)), 1, None, 7):
        p = np.array(perm)
        got = upgrad_weights(torch.from_numpy(gram[np.ix_(p, p)])).numpy()
        back = np.empty(k)
        back[p] = got
        assert update_distance(back, base, gram) <= 2 * exact_tol() * size_of(gram), perm


@pytest.mark.parametrize("case", range(len(CASES)))
def test_near_singular_gram_without_extended_precision(case, monkeypatch):
    """Where ``numpy.longdouble`` is float64 the refinement is in float64: less precise, still
    converged and far closer than the former solver."""
    monkeypatch.setattr(methods, "_LD", np.float64)
    monkeypatch.setattr(methods, "_EPS_LD", float(np.finfo(np.float64).eps))
    gram_l, exact = CASES[case]
    gram = np.array(gram_l)
    coef, converged = methods._upgrad(torch.from_numpy(gram), None)
    assert converged
    assert update_distance(coef.numpy(), exact, gram) <= 3e-4 * size_of(gram)


def test_exact_references_are_exact():
    """The hard-coded answers are the exact solutions for the Gram entries (60 digits)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    for gram_l, exact in CASES:
        k = len(gram_l)
        g = mp.matrix(gram_l)
        total = [mp.mpf(0)] * k
        for i in range(k):
            u = [mp.mpf(0)] * k
            u[i] = mp.mpf(1) / k
            best, best_obj = None, None
            for r in range(k + 1):  # brute force over the free sets: the KKT point of least value
                for free in itertools.combinations(range(k), r):
                    v = list(u)
                    if r:
                        fixed = [j for j in range(k) if j not in free]
                        rhs = mp.matrix([-sum(g[a, b] * u[b] for b in fixed) for a in free])
                        try:
                            sol = mp.lu_solve(mp.matrix([[g[a, b] for b in free] for a in free]), rhs)
                        except ZeroDivisionError:  # singular block: not an optimum's free set
                            continue
                        if any(sol[j] < u[a] for j, a in enumerate(free)):
                            continue
                        for j, a in enumerate(free):
                            v[a] = sol[j]
                    gv = [sum(g[a, b] * v[b] for b in range(k)) for a in range(k)]
                    if any(x < -mp.mpf(10) ** -40 for x in gv):
                        continue
                    obj = sum(v[a] * gv[a] for a in range(k))
                    if best_obj is None or obj < best_obj:
                        best, best_obj = v, obj
            total = [t + b for t, b in zip(total, best)]
        assert np.allclose([float(t) for t in total], exact, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- warning


def test_non_convergence_warns_once_per_task_set_and_is_exposed(monkeypatch, caplog):
    gram = torch.tensor(GRAM_A, dtype=torch.float64)
    # force every stage to miss: the active set reports no convergence, no fallback does better,
    # the refinement rejects its point
    monkeypatch.setattr(methods, "_lawson_hanson", lambda a, b, max_iter: (np.zeros(a.shape[1]), False))
    monkeypatch.setattr(methods, "_nnls_enumerate", lambda a, b: np.zeros(a.shape[1]))
    monkeypatch.setattr(methods, "_dual_cone_refine", lambda g, u, v0: None)
    monkeypatch.setattr(methods, "_UPGRAD_WARNED", set())
    method = make_method("upgrad")
    assert method.converged is None
    ctx = MethodContext(tasks=tuple("abcde"), step=3, generator=torch.Generator())
    with caplog.at_level(logging.WARNING, logger="balancedmix.methods"):
        coef = method(gram, ctx)
        method(gram, ctx)
    assert torch.isfinite(coef).all()
    assert method.converged is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "warned more than once for the same tasks"
    msg = warnings[0].getMessage()
    assert "['a', 'b', 'c', 'd', 'e']" in msg and "step 3" in msg and "optimality" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balancedmix.methods"):
        method(gram, MethodContext(tasks=tuple("vwxyz"), step=4, generator=torch.Generator()))
        upgrad_weights(gram)  # the bare function: no names, says how many tasks
        upgrad_weights(gram, tasks=list("pqrst"))
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 3 and "['v', 'w', 'x', 'y', 'z']" in msgs[0] and "5 tasks" in msgs[1]
    assert "['p', 'q', 'r', 's', 't']" in msgs[2]


def test_converged_is_true_after_a_normal_step():
    method = UPGrad()
    method(torch.tensor(GRAM_B, dtype=torch.float64), MethodContext(tasks=tuple("abcde"), step=0, generator=torch.Generator()))
    assert method.converged is True


def test_fallback_alone_solves_the_regression_case(monkeypatch):
    """With the active set disabled (as if it had cycled), the fallback stages still give the
    exact update."""
    monkeypatch.setattr(methods, "_lawson_hanson", lambda a, b, max_iter: (np.zeros(a.shape[1]), False))
    gram = np.array(GRAM_A)
    coef, converged = methods._upgrad(torch.from_numpy(gram), None)
    assert converged
    assert update_distance(coef.numpy(), EXACT_A, gram) <= exact_tol() * size_of(gram)


def test_lawson_hanson_does_not_cycle_on_the_regression_case():
    gram = np.array(GRAM_A)
    n = np.sqrt(np.diagonal(gram))
    factor, singular = methods._psd_factor(gram / np.outer(n, n))
    assert not singular
    for i in range(len(gram)):
        u = np.zeros(len(gram))
        u[i] = n[i] / len(gram)
        b = -(factor @ u)
        x, converged = methods._lawson_hanson(factor, b, max_iter=180)
        assert converged and methods._kkt_ok(factor, b, x, np.linalg.norm(factor, axis=0)), i


# ----------------------------------------------------------------------------- properties


@st.composite
def task_gradients(draw):
    """``[K, D]`` task gradients: ``r`` independent rows (norms 1e-3..1e3) and ``K − r``
    combinations of them (coefficients random or multiples of 1/2), then exact in float64,
    perturbed by relative noise 1e-8..1e-4, or rounded to float32."""
    k = draw(st.integers(1, 7))
    d = draw(st.sampled_from([1, 2, 3, 5, 16, 64]))
    r = draw(st.integers(1, k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.standard_normal((r, d)) * 10.0 ** rng.integers(-3, 4, size=(r, 1))
    mix = rng.standard_normal((k - r, r))
    if draw(st.booleans()):
        mix = np.round(mix * 2) / 2
    v = np.vstack([base, mix @ base])[rng.permutation(k)]
    noise = draw(st.sampled_from(["exact", "float32", "relative"]))
    if noise == "float32":
        v = v.astype(np.float32).astype(np.float64)
    elif noise == "relative":
        eta = 10.0 ** draw(st.floats(-8, -4))
        v = v + eta * rng.standard_normal(v.shape) * np.linalg.norm(v, axis=1, keepdims=True) / np.sqrt(d)
    return v


PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(v=task_gradients(), row=st.integers(0, 6), weight=st.floats(0.01, 10))
def test_projection_meets_optimality_conditions(v, row, weight):
    gram = v @ v.T
    keep = np.flatnonzero(np.diagonal(gram) > 0)
    assume(keep.size > 0)
    gram = gram[np.ix_(keep, keep)]
    k = len(gram)
    u = np.zeros(k)
    u[row % k] = weight
    assert_kkt(gram, u, dual_cone_weights(gram, u))


@PROPS
@given(v=task_gradients(), seed=st.integers(0, 10**6))
def test_update_does_not_depend_on_task_order(v, seed):
    gram = v @ v.T
    perm = np.random.default_rng(seed).permutation(len(v))
    a = upgrad_weights(torch.from_numpy(gram)).numpy() @ v
    b = upgrad_weights(torch.from_numpy(gram[np.ix_(perm, perm)])).numpy() @ v[perm]
    norms = np.linalg.norm(v, axis=1)
    assert np.linalg.norm(a - b) <= 1e-7 * (norms.sum() or 1.0)


@PROPS
@given(v=task_gradients())
def test_update_matches_scipy_nnls_on_the_vectors(v):
    """Reference: each projection by scipy's NNLS on the explicit vectors (condition number the
    square root of the Gram's), where the answer is determined in float64: at least as many
    dimensions as tasks and unit rows with singular values > 1e-5 (unit-Gram eigenvalues > 1e-10).
    With dependent rows the exact answer for the float64 vectors can hinge on their 1e-16-level
    departures from dependence (three nearly collinear rows: two tiny angles whose ratio is
    O(1)); those cases are covered by the optimality and task-order properties instead."""
    from scipy.optimize import nnls

    norms = np.linalg.norm(v, axis=1)
    keep = np.flatnonzero(norms > methods.ZERO_REL * norms.max()) if norms.max() > 0 else np.zeros(0, int)
    assume(keep.size > 0 and keep.size <= v.shape[1])
    sv = np.linalg.svd(v[keep] / norms[keep, None], compute_uv=False)
    assume((sv > 1e-5).all())
    ref = np.zeros(v.shape[1])
    for i in keep:
        y = v[i] / keep.size
        x = nnls(v[keep].T, -y, maxiter=10_000)[0]
        ref += y + v[keep].T @ x
    got = upgrad_weights(torch.from_numpy(v @ v.T)).numpy() @ v
    assert np.linalg.norm(got - ref) <= 1e-7 * norms.sum()
