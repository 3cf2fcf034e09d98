"""Paired intervals and the windowed learning gain against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from balancedmix.significance import paired_comparison, t_quantile, windowed_gain


@settings(max_examples=200, deadline=None)
@given(p=st.floats(1e-3, 1 - 1e-3), df=st.floats(1.0, 500.0))
def test_t_quantile_matches_scipy(p: float, df: float) -> None:
    ref = stats.t.ppf(p, df)
    assert t_quantile(p, df) == pytest.approx(ref, rel=1e-7, abs=1e-7)


def _gain_reference(r: list[float], s: int) -> list[float]:
    out = []
    for t in range(len(r)):
        if t < s or t + s >= len(r):
            out.append(math.nan)
            continue
        after = [x for x in r[t + 1 : t + s + 1] if math.isfinite(x)]
        before = [x for x in r[t - s : t] if math.isfinite(x)]
        out.append(sum(after) / len(after) - sum(before) / len(before) if after and before else math.nan)
    return out


@settings(max_examples=200, deadline=None)
@given(
    r=st.lists(st.one_of(st.floats(-5, 5), st.just(math.nan)), min_size=0, max_size=40),
    s=st.integers(1, 8),
)
def test_windowed_gain_is_the_papers_formula(r: list[float], s: int) -> None:
    np.testing.assert_allclose(windowed_gain(r, s), _gain_reference(r, s), atol=1e-12, equal_nan=True)


def test_windowed_gain_rejects_bad_window() -> None:
    with pytest.raises(ValueError, match="window"):
        windowed_gain([1.0, 2.0, 3.0], 0)


def _crossed(rng: np.random.Generator, seeds: int, prompts: int, effect: float, sd_seed: float, sd_prompt: float, sd_resid: float) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and treated scores whose difference is effect + seed + prompt + residual effects."""
    base = rng.normal(0.5, 0.3, (seeds, prompts))
    diff = (
        effect
        + rng.normal(0, sd_seed, seeds)[:, None]
        + rng.normal(0, sd_prompt, prompts)[None, :]
        + rng.normal(0, sd_resid, (seeds, prompts))
    )
    return base + diff, base


@pytest.mark.parametrize(
    "seeds,prompts,sd_seed,sd_prompt,sd_resid",
    [(5, 128, 0.03, 0.05, 0.3), (3, 64, 0.05, 0.02, 0.3), (1, 200, 0.0, 0.05, 0.3), (8, 32, 0.1, 0.0, 0.5)],
)
def test_interval_coverage_is_close_to_nominal(seeds: int, prompts: int, sd_seed: float, sd_prompt: float, sd_resid: float) -> None:
    rng = np.random.default_rng(seeds * 1000 + prompts)
    reps, effect, hits = 600, 0.03, 0
    for _ in range(reps):
        t, b = _crossed(rng, seeds, prompts, effect, sd_seed, sd_prompt, sd_resid)
        iv = paired_comparison({"x": t}, {"x": b}).tasks["x"]
        hits += iv.low <= effect <= iv.high
    # 600 repetitions: the binomial standard error of a 95 % coverage is 0.009.
    assert 0.92 <= hits / reps <= 0.975


def test_mean_over_tasks_coverage_with_shared_seed_effects() -> None:
    """Seed effects shared by all tasks of a run (one training run per seed) are accounted for."""
    rng = np.random.default_rng(7)
    reps, hits = 600, 0
    effects = {"a": 0.05, "b": -0.01, "c": 0.02}
    for _ in range(reps):
        shared = rng.normal(0, 0.05, 4)
        treated, baseline = {}, {}
        for task, eff in effects.items():
            t, b = _crossed(rng, 4, 50, eff, 0.01, 0.03, 0.3)
            treated[task], baseline[task] = t + shared[:, None], b
        iv = paired_comparison(treated, baseline).mean
        hits += iv.low <= np.mean(list(effects.values())) <= iv.high
    assert 0.92 <= hits / reps <= 0.975


def test_no_effect_gives_no_verdict_most_of_the_time() -> None:
    rng = np.random.default_rng(11)
    verdicts = [paired_comparison({"x": t}, {"x": b}).tasks["x"].verdict for t, b in (_crossed(rng, 5, 100, 0.0, 0.03, 0.03, 0.3) for _ in range(400))]
    assert verdicts.count("undecided") / len(verdicts) >= 0.93
    assert verdicts.count("better") > 0 or verdicts.count("worse") > 0  # the test has power to see a false alarm


def test_planted_effects_are_decided_with_sign() -> None:
    rng = np.random.default_rng(3)
    t, b = _crossed(rng, 5, 256, 0.08, 0.01, 0.01, 0.2)
    assert paired_comparison({"x": t}, {"x": b}).tasks["x"].verdict == "better"
    assert paired_comparison({"x": b}, {"x": t}).tasks["x"].verdict == "worse"


def test_identical_runs_have_a_zero_width_undecided_interval() -> None:
    scores = np.random.default_rng(0).integers(0, 2, (3, 40)).astype(float)
    iv = paired_comparison({"x": scores}, {"x": scores.copy()}).tasks["x"]
    assert (iv.estimate, iv.low, iv.high, iv.verdict) == (0.0, 0.0, 0.0, "undecided")


def test_one_seed_is_the_paired_t_interval_over_prompts() -> None:
    rng = np.random.default_rng(5)
    t, b = rng.integers(0, 2, 150).astype(float), rng.integers(0, 2, 150).astype(float)
    iv = paired_comparison({"x": t}, {"x": b}).tasks["x"]
    ref = stats.ttest_rel(t, b).confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high), abs=1e-10)
    assert iv.seeds == 1


def test_one_prompt_is_the_paired_t_interval_over_seeds() -> None:
    rng = np.random.default_rng(6)
    t, b = rng.normal(0.6, 0.1, (6, 1)), rng.normal(0.5, 0.1, (6, 1))
    iv = paired_comparison({"x": t}, {"x": b}).tasks["x"]
    ref = stats.ttest_rel(t[:, 0], b[:, 0]).confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high), abs=1e-10)


def test_mean_and_worst_estimates() -> None:
    treated = {"a": [[1, 1, 0, 1]], "b": [[0, 0, 1, 0]]}
    baseline = {"a": [[1, 0, 0, 1]], "b": [[1, 0, 1, 0]]}
    cmp = paired_comparison(treated, baseline)
    assert cmp.tasks["a"].estimate == pytest.approx(0.25)
    assert cmp.tasks["b"].estimate == pytest.approx(-0.25)
    assert cmp.mean.estimate == pytest.approx(0.0)
    assert cmp.worst.estimate == pytest.approx(0.25 - 0.5)  # treated's worst is b (0.25), baseline's is a or b (0.5)


@pytest.mark.parametrize(
    "treated,baseline,match",
    [
        ({"a": [[1.0]]}, {"b": [[1.0]]}, "different tasks"),
        ({"a": [[1.0, 0.0]]}, {"a": [[1.0]]}, "same seeds and the same prompts"),
        ({"a": [[1.0]], "b": [[1.0], [0.0]]}, {"a": [[1.0]], "b": [[1.0], [0.0]]}, "same number of seeds"),
        ({"a": [[math.nan]]}, {"a": [[1.0]]}, "NaN"),
        ({}, {}, "no tasks"),
    ],
)
def test_bad_input_is_named(treated: dict, baseline: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_comparison(treated, baseline)
