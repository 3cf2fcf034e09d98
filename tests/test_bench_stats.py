"""Statistics of the benchmarks' paired timing (benchmarks/common.py, issue 17 item 5).

The median's distribution-free interval, the met / missed / undecided verdict and the stopping
rule, on synthetic numbers and a fake clock: nothing here times anything.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the repo root

from benchmarks.common import (  # noqa: E402
    MedianCI,
    PairedTimer,
    Runner,
    _binom_cdf_half,
    median_ci,
    ratio_target,
    render_targets,
    time_paired,
    verdict,
)


# ----------------------------------------------------------------------------- the interval
def test_binomial_cdf_exact_values():
    assert _binom_cdf_half(0, 6) == 1 / 64
    assert _binom_cdf_half(1, 10) == 11 / 1024
    assert _binom_cdf_half(10, 10) == 1.0
    assert _binom_cdf_half(-1, 10) == 0.0


def test_known_order_statistics():
    xs = list(range(1, 11))  # n = 10: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024 -> [x_(2), x_(9)]
    ci = median_ci(xs)
    assert (ci.lo, ci.hi, ci.median, ci.n) == (2.0, 9.0, 5.5, 10)
    assert ci.coverage == pytest.approx(1 - 22 / 1024)
    ci6 = median_ci([6, 1, 5, 2, 4, 3])  # n = 6: only the extremes, coverage 1 - 2/64
    assert (ci6.lo, ci6.hi) == (1.0, 6.0) and ci6.coverage == pytest.approx(62 / 64)
    ci100 = median_ci(range(100))  # the classic n = 100 interval: ranks 40 and 61
    assert (ci100.lo, ci100.hi) == (39.0, 60.0)


def test_too_few_values_give_no_interval():
    ci = median_ci([1.0, 1.1, 0.9, 1.05, 1.0])  # 2^-5 * 2 = 0.0625 > 0.05
    assert ci.lo is None and ci.hi is None and ci.coverage is None
    assert math.isinf(ci.half_width) and math.isinf(ci.rel_half_width)
    assert ci.median == 1.0
    assert verdict(ci, 2.0) == "undecided"  # far below the limit, but no interval: not "met"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one value"):
        median_ci([])
    with pytest.raises(ValueError, match="NaN"):
        median_ci([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="confidence"):
        median_ci([1.0] * 10, confidence=1.0)
    with pytest.raises(ValueError, match="kind"):
        verdict(median_ci([1.0] * 10), 1.0, "<")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_interval_brackets_the_median_and_is_the_shortest_with_the_coverage(xs, confidence):
    ci = median_ci(xs, confidence)
    n = len(xs)
    if ci.lo is None:
        assert 1 - 2 * _binom_cdf_half(0, n) < confidence  # not even the extremes reach it
        return
    assert ci.lo <= ci.median <= ci.hi
    assert ci.lo in xs and ci.hi in xs
    j = sorted(xs).index(ci.lo) + 1 if sorted(xs).count(ci.lo) == 1 else None
    assert ci.coverage >= confidence - 1e-12
    if j is not None and j + 1 <= n // 2:  # one rank further in would fall below the confidence
        assert 1 - 2 * _binom_cdf_half(j, n) < confidence


@pytest.mark.parametrize("n", [6, 9, 20, 61])
@pytest.mark.parametrize("dist", ["exponential", "lognormal"])
def test_coverage_on_skewed_data_with_known_median(n, dist):
    """2000 synthetic samples per case: the interval holds the true median at its stated rate."""
    rng = random.Random(1000 * n + len(dist))
    if dist == "exponential":
        draw, true_median = (lambda: rng.expovariate(1.0)), math.log(2.0)
    else:  # timing-like: ratio 1.02 times a right-skewed noise factor
        draw, true_median = (lambda: 1.02 * rng.lognormvariate(0.0, 0.05)), 1.02
    reps = 2000
    hits = 0
    coverage = None
    for _ in range(reps):
        ci = median_ci([draw() for _ in range(n)])
        coverage = ci.coverage
        hits += ci.lo <= true_median <= ci.hi
    rate = hits / reps
    sd = math.sqrt(coverage * (1 - coverage) / reps)
    assert coverage >= 0.95
    assert abs(rate - coverage) <= 4 * sd, (rate, coverage)  # exact for continuous data, up to sampling


# ----------------------------------------------------------------------------- verdicts
def _ci(lo, hi, med=None):
    return MedianCI((lo + hi) / 2 if med is None else med, lo, hi, 20, 0.96)


@pytest.mark.parametrize(
    "lo,hi,limit,kind,expected",
    [
        (1.00, 1.02, 1.03, "<=", "met"),
        (1.00, 1.03, 1.03, "<=", "met"),  # the limit itself satisfies "<="
        (1.031, 1.05, 1.03, "<=", "missed"),
        (1.02, 1.04, 1.03, "<=", "undecided"),
        (3.6, 4.0, 3.5, ">=", "met"),
        (3.0, 3.4, 3.5, ">=", "missed"),
        (3.4, 3.6, 3.5, ">=", "undecided"),
    ],
)
def test_verdict(lo, hi, limit, kind, expected):
    assert verdict(_ci(lo, hi), limit, kind) == expected


def test_ratio_target_maps_verdicts_and_renders_them():
    met = ratio_target("a", {"ratio": 1.01, "ratio_lo": 1.0, "ratio_hi": 1.02, "pairs": 30, "ratio_coverage": 0.95}, 1.03)
    missed = ratio_target("b", {"ratio": 1.2, "ratio_lo": 1.1, "ratio_hi": 1.3, "pairs": 30}, 1.03)
    undecided = ratio_target("c", {"ratio": 1.025, "ratio_lo": 1.01, "ratio_hi": 1.04, "pairs": 30}, 1.03)
    too_few = ratio_target("d", {"ratio": 1.0, "ratio_lo": None, "ratio_hi": None, "pairs": 3}, 1.03)
    absent = ratio_target("e", None, 1.03)
    assert [t["verdict"] for t in (met, missed, undecided, too_few, absent)] == ["met", "missed", "undecided", "undecided", "not measured"]
    assert [t["met"] for t in (met, missed, undecided, too_few, absent)] == [True, False, None, None, None]
    text = render_targets([met, missed, undecided, too_few, absent])
    assert "**undecided**" in text and "[1.010, 1.040] (30)" in text and "— (3)" in text and "| not measured |" in text


# ----------------------------------------------------------------------------- the stopping rule
def test_stops_on_precision_once_enough_pairs():
    timer = PairedTimer([None, 0], precision=0.01, budget_s=100.0, min_pairs=6)
    for r in range(6):
        assert timer.stop_reason(elapsed_s=float(r)) is None or r >= 6
        timer.add_round([1.0, 1.05])
    assert timer.stop_reason(elapsed_s=6.0) == "precision"
    assert timer.ratio_ci(1).median == pytest.approx(1.05)


def test_noisy_ratios_run_to_the_budget_then_max_pairs():
    rng = random.Random(0)
    timer = PairedTimer([None, 0, 0], precision=0.01, budget_s=10.0, min_pairs=6, max_pairs=50)
    for _ in range(20):
        timer.add_round([1.0, 1.0 + rng.uniform(-0.2, 0.2), 1.0])  # configuration 1: ±20 % noise
    assert timer.ratio_ci(2).rel_half_width == 0  # one precise ratio is not enough: all must be
    assert timer.stop_reason(elapsed_s=9.9) is None
    assert timer.stop_reason(elapsed_s=10.0) == "budget"
    for _ in range(30):
        timer.add_round([1.0, 1.0 + rng.uniform(-0.2, 0.2), 1.0])
    assert timer.stop_reason(elapsed_s=0.0) == "max_pairs"


def test_precision_is_relative_to_the_ratio():
    timer = PairedTimer([None, 0], precision=0.01, budget_s=1e9, min_pairs=6)
    for d in (-0.015, -0.01, 0.0, 0.0, 0.01, 0.015) * 2:  # ratio ~3, spread ±0.015: 0.5 % of it
        timer.add_round([1.0, 3.0 + d])
    assert timer.stop_reason(0.0) == "precision"


def test_several_baselines_and_bad_configuration():
    timer = PairedTimer([None, 0, None, 2])
    timer.add_round([1.0, 2.0, 10.0, 15.0])
    assert timer.ratios(1) == [2.0] and timer.ratios(3) == [1.5] and timer.ratios(0) == [1.0]
    assert timer.ratios(3, 1) == [7.5]
    with pytest.raises(ValueError, match="round needs 4 times"):
        timer.add_round([1.0, 2.0])
    with pytest.raises(ValueError, match="not a baseline"):
        PairedTimer([None, 2, 1])  # 1's baseline is 2, which is not a baseline itself
    with pytest.raises(ValueError, match="stopping rule"):
        PairedTimer([None, 0], min_pairs=10, max_pairs=5)


def test_time_paired_alternates_and_pairs_on_a_fake_clock():
    """Each runner advances a fake clock by a fixed amount: ratios are exact, the order alternates."""
    now = [0.0]
    calls: list[str] = []

    def runner(name: str, cost: float):
        def step() -> None:
            calls.append(name)
            now[0] += cost

        return lambda: Runner(name, step, {"impl": name})

    rows = time_paired([runner("plain", 1.0), runner("bm", 1.02)], budget_s=1e9, min_pairs=8, clock=lambda: now[0], warmup=1)
    assert calls[:2] == ["plain", "bm"]  # warm-up
    timed = calls[2:]
    assert timed[:4] == ["plain", "bm", "bm", "plain"]  # reversed every other round
    plain, bm = rows
    assert bm["stop"] == "precision" and bm["pairs"] == 8 and len(bm["times_s"]) == 8
    assert bm["ratio"] == pytest.approx(1.02) and bm["ratio_lo"] == pytest.approx(1.02)
    assert plain["baseline"] and plain["ratio"] == 1.0


def test_time_paired_stops_at_the_budget_with_an_undecided_interval():
    now = [0.0]
    rng = random.Random(3)

    def make(name: str, noisy: bool):
        def step() -> None:
            now[0] += 1.0 * (1.0 + (rng.uniform(-0.3, 0.3) if noisy else 0.0))

        return lambda: Runner(name, step, {})

    rows = time_paired([make("plain", False), make("bm", True)], budget_s=12.0, min_pairs=6, clock=lambda: now[0])
    bm = rows[1]
    assert bm["stop"] == "budget" and 6 <= bm["pairs"] <= 7
    t = ratio_target("bm", bm, 1.0)
    assert t["verdict"] == "undecided"  # a ±30 % ratio around 1 cannot decide a target at 1


# ----------------------------------------------------------------------------- docs markers
def test_update_docs_refuses_a_page_with_repeated_markers(tmp_path):
    """docs/benchmarks.md once had two `results:cpu:end` markers: the update kept the old tables
    between them and appended them after the new ones, silently."""
    from benchmarks.__main__ import update_docs

    page = tmp_path / "b.md"
    text = "<!-- results:cpu:begin -->\nold 1\n<!-- results:cpu:end -->\nold 2\n<!-- results:cpu:end -->\n"
    page.write_text(text)
    with pytest.raises(ValueError, match="2 .*results:cpu:end"):
        update_docs("new", "cpu", page)
    assert page.read_text() == text  # nothing written


def test_docs_page_has_one_marker_pair_per_group():
    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    for group in ("cpu", "gpu"):
        assert page.count(f"<!-- results:{group}:begin -->") == 1
        assert page.count(f"<!-- results:{group}:end -->") == 1


def test_the_budget_never_cuts_the_minimum_number_of_pairs():
    timer = PairedTimer([None, 0], precision=0.01, budget_s=1.0, min_pairs=6)
    for _ in range(5):
        timer.add_round([1.0, 1.3])
        assert timer.stop_reason(elapsed_s=100.0) is None
    timer.add_round([1.0, 1.3])
    assert timer.stop_reason(elapsed_s=100.0) == "precision"  # identical ratios: zero width


# ----------------------------------------------------------------------------- the distributed table (no processes)
def _fake_row(variant, engine, base, ratios, buf=0, local=1000, comm=0, engine_bytes=4000):
    return {"variant": variant, "engine": engine, "baseline_variant": base, "params": 1000, "local_numel_max": local,
            "engine_grad_bytes_per_step": engine_bytes, "ddp_bytes_per_step": 0, "balancedmix_bytes_per_step": comm,
            "buffer_bytes_per_rank": buf, "total_bytes_per_step": engine_bytes + comm, "ms_per_step_median": 10.0,
            **(_paired(ratios) if base else {"pairs": len(ratios), "ratio": 1.0, "ratio_lo": None, "ratio_hi": None, "baseline": True})}


def _paired(ratios):
    ci = median_ci(ratios)
    return {"pairs": len(ratios), "ratios": ratios, "ratio": ci.median, "ratio_lo": ci.lo, "ratio_hi": ci.hi, "ratio_coverage": ci.coverage}


def test_ddp_suite_table_from_a_result(monkeypatch):
    import benchmarks.ddp as ddp

    ones = [1.0] * 8
    result = {"world_size": 2, "micro_batches": 4, "tasks": 2, "steps": 8, "stop": "budget", "budget_s": 5.0, "precision": 0.01,
              "rows": [
                  _fake_row("plain", "ddp", None, ones),
                  _fake_row("ddp_sum", "ddp", "plain", [1.3 + 0.01 * i for i in range(8)], buf=3 * 1000 * 4, comm=8000),
                  _fake_row("fsdp2_plain", "fsdp2", None, ones, local=500, engine_bytes=16000),
                  _fake_row("fsdp2_sum", "fsdp2", "fsdp2_plain", [1.0 + 0.001 * i for i in range(8)], buf=3 * 500 * 4, local=500,
                            comm=216, engine_bytes=16000),
              ]}

    class Script:
        VARIANTS = ("plain", "ddp_sum", "fsdp2_plain", "fsdp2_sum")
        ZERO_VARIANTS = ("zero2_plain",)

        @staticmethod
        def zero_unavailable():
            return "deepspeed is not installed"

        @staticmethod
        def launch(**kw):
            assert "zero" not in kw["variants"]
            assert kw["budget_s"] == 5.0 and kw["steps"] >= 6
            return result

    monkeypatch.setattr(ddp, "_load_script", lambda: Script)
    suite = ddp.run(quick=True, repeats=6)
    t = {x["name"].split(":")[0]: x for x in suite["targets"]}
    assert t["DDP"]["verdict"] == "missed"  # [1.31, 1.36] > 1.15
    assert t["FSDP2"]["met"] is True  # 3 rows × 500 × 4 bytes, shard < P
    rows = {r["variant"]: r for r in suite["rows"]}
    assert rows["fsdp2_sum"]["buffer_rows"] == 3 and rows["fsdp2_sum"]["k_shard_s"] == "3.91 KiB"
    assert rows["plain"]["ratio_s"] == "1 (baseline)" and rows["ddp_sum"]["ratio_s"].startswith("1.335× [")
    text = render_suite_text(suite)
    assert "fsdp2_sum" in text and "**missed**" in text
    assert suite["skipped"] == ["DeepSpeed ZeRO-2/3 rows: deepspeed is not installed"]
    assert "skipped: DeepSpeed ZeRO-2/3 rows: deepspeed is not installed" in text
    # a buffer that is rows × P (not sharded) fails the check
    result["rows"][3]["buffer_bytes_per_rank"] = 3 * 1000 * 4
    suite = ddp.run(quick=True, repeats=6)
    assert next(x for x in suite["targets"] if x["name"].startswith("FSDP2"))["met"] is False


def render_suite_text(suite):
    from benchmarks.common import render_suite

    return render_suite("x", suite)


def test_ddp_suite_targets_the_overlap_variant(monkeypatch):
    """With ``overlap_sum`` measured, the issue-17 ratio target is taken on it, and its bytes are
    compared with sync='ddp''s (DDP's all-reduce + the row all-reduce)."""
    import benchmarks.ddp as ddp

    ones = [1.0] * 8
    result = {"world_size": 2, "micro_batches": 4, "tasks": 2, "steps": 8, "stop": "budget", "budget_s": 5.0, "precision": 0.01,
              "rows": [
                  _fake_row("plain", "ddp", None, ones),
                  _fake_row("ddp_sum", "ddp", "plain", [1.6] * 8, buf=3 * 1000 * 4, comm=8000),
                  _fake_row("overlap_sum", "ddp", "plain", [1.10 + 0.001 * i for i in range(8)], buf=3 * 1000 * 4, comm=8000,
                            engine_bytes=0),
              ]}

    class Script:
        VARIANTS = ("plain", "ddp_sum", "overlap_sum")
        ZERO_VARIANTS = ()

        @staticmethod
        def zero_unavailable():
            return "deepspeed is not installed"

        @staticmethod
        def launch(**kw):
            return result

    monkeypatch.setattr(ddp, "_load_script", lambda: Script)
    targets = {x["name"]: x for x in ddp.run(quick=True, repeats=6)["targets"]}
    ratio = next(x for name, x in targets.items() if "ddp_overlap step" in name)
    assert ratio["verdict"] == "met"  # [1.10, 1.11] <= 1.15
    assert not any("sync='ddp') step" in name for name in targets)
    nbytes = next(x for name, x in targets.items() if "bytes per step" in name)
    assert nbytes["met"] is True and nbytes["value"] == 8000 / 12000
