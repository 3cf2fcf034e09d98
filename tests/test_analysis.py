"""balancedmix.analysis on synthetic logs with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from balancedmix import analysis as A

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, records: list[dict], evals: list[dict] | None = None, meta: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    if evals is not None:
        with open(folder / "eval.jsonl", "w") as fh:
            for r in evals:
                fh.write(json.dumps(r) + "\n")
    if meta is not None:
        (folder / "run.json").write_text(json.dumps(meta))
    return folder


def synthetic_records(n: int = 40, seed: int = 0) -> list[dict]:
    """Task a: |g| = 3, b: |g| = 1 (sqnorm ratio 9); reward of a rises 0.01 per step, b flat."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        ga, gb = 3.0, 1.0
        out.append(
            {
                "step": s,
                "time": 1000.0 + 0.5 * s,
                "grad_norm/a": ga,
                "grad_norm/b": gb,
                "grad_norm/total": 3.5,
                "grad_sqnorm_unbiased/a": 4.0,
                "grad_sqnorm_unbiased/b": 1.0,
                "update_share/a": 0.8,
                "update_share/b": 0.2,
                "coef/a": 1.0,
                "coef/b": 1.0,
                "cos/a/b": 0.25,
                "reward/a/mean": 0.01 * s,
                "reward/b/mean": 0.5,
                "reward/a/std": float(rng.random()),
                "reward/b/std": float(rng.random()),
            }
        )
    return out


# ------------------------------------------------------------------------------ correlations
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=30))
def test_pearson_spearman_match_scipy(pairs):
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert math.isnan(A.pearson(x, y))
        return
    ref_p = sps.pearsonr(x, y).statistic
    if math.isfinite(ref_p):
        assert A.pearson(x, y) == pytest.approx(ref_p, abs=1e-6)
    ref_s = sps.spearmanr(x, y).statistic
    if math.isfinite(ref_s):
        assert A.spearman(x, y) == pytest.approx(ref_s, abs=1e-9)


def test_ranks_average_ties():
    assert A._ranks(np.array([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]


def test_correlation_ignores_nonfinite_and_needs_three_points():
    assert A.pearson([1, 2, np.nan, 4], [2, 4, 5, 8]) == pytest.approx(1.0)
    assert math.isnan(A.spearman([1, 2], [3, 4]))
    with pytest.raises(ValueError, match="same length"):
        A.pearson([1, 2, 3], [1, 2])


def test_known_correlations_per_task_and_pooled(tmp_path):
    recs = []
    for s in range(30):
        ga, gb = 1.0 + 0.1 * s, 5.0 + 0.2 * s
        recs.append(
            {
                "step": s,
                "grad_norm/a": ga,
                "grad_norm/b": gb,
                "reward/a/mean": 2 * ga + 1,  # exactly linear: r = 1
                "reward/b/mean": -gb,  # exactly anti-linear: r = -1
                "advantage/a/abs_mean": ga**3,  # monotone, not linear: spearman 1, pearson < 1
                "advantage/b/abs_mean": gb**3,
            }
        )
    run = A.load_run(write_run(tmp_path / "r", recs))
    rows = {(r["scope"], r["statistic"]): r for r in A.correlations(run)}
    assert rows[("a", "reward")]["pearson"] == pytest.approx(1.0)
    assert rows[("b", "reward")]["pearson"] == pytest.approx(-1.0)
    assert rows[("b", "reward")]["spearman"] == pytest.approx(-1.0)
    assert rows[("a", "abs advantage")]["spearman"] == pytest.approx(1.0)
    assert rows[("a", "abs advantage")]["pearson"] < 0.999
    # pooled: all 60 (g, stat) pairs together; reference from scipy on the concatenation
    g = np.array([r["grad_norm/a"] for r in recs] + [r["grad_norm/b"] for r in recs])
    adv = np.array([r["advantage/a/abs_mean"] for r in recs] + [r["advantage/b/abs_mean"] for r in recs])
    rew = np.array([r["reward/a/mean"] for r in recs] + [r["reward/b/mean"] for r in recs])
    assert rows[("pooled", "abs advantage")]["spearman"] == pytest.approx(1.0)
    assert rows[("pooled", "reward")]["pearson"] == pytest.approx(sps.pearsonr(g, rew).statistic)
    assert rows[("pooled", "reward")]["n"] == 60
    assert rows[("pooled", "abs advantage")]["pearson"] == pytest.approx(sps.pearsonr(g, adv).statistic)
    # statistics no task logged are left out
    assert not any(r["statistic"] == "completion length" for r in A.correlations(run))


# --------------------------------------------------------------------------- ratios and gains
def test_known_ratios(tmp_path):
    run = A.load_run(write_run(tmp_path / "sum", synthetic_records()))
    assert run.tasks == ("a", "b")
    assert A.sqnorm_ratio(run) == (pytest.approx(9.0), "a", "b")
    assert A.sqnorm_ratio(run, unbiased=True) == (pytest.approx(4.0), "a", "b")
    np.testing.assert_allclose(A.norm_ratio_series(run), 3.0)
    np.testing.assert_allclose(A.norm_ratio_series(run, unbiased=True), 2.0)


def test_ratio_with_varying_norms_matches_reference(tmp_path):
    rng = np.random.default_rng(3)
    g = rng.uniform(0.1, 5.0, size=(25, 3))
    recs = [{"step": s, **{f"grad_norm/t{k}": float(g[s, k]) for k in range(3)}} for s in range(25)]
    run = A.load_run(write_run(tmp_path / "r", recs))
    np.testing.assert_allclose(A.norm_ratio_series(run), g.max(1) / g.min(1))
    means = (g**2).mean(0)
    ratio, hi, lo = A.sqnorm_ratio(run)
    assert ratio == pytest.approx(means.max() / means.min())
    assert (hi, lo) == (f"t{means.argmax()}", f"t{means.argmin()}")


def test_unbiased_ratio_undefined_when_estimate_nonpositive(tmp_path):
    recs = [{"step": s, "grad_norm/a": 2.0, "grad_norm/b": 1.0, "grad_sqnorm_unbiased/a": 1.0, "grad_sqnorm_unbiased/b": -0.5} for s in range(5)]
    run = A.load_run(write_run(tmp_path / "r", recs))
    ratio, hi, lo = A.sqnorm_ratio(run, unbiased=True)
    assert math.isnan(ratio) and (hi, lo) == ("a", "b")
    assert np.isnan(A.norm_ratio_series(run, unbiased=True)).all()


def test_known_learning_gains(tmp_path):
    evals = [
        {"step": 0, "eval/accuracy/a": 0.2, "eval/accuracy/b": 0.6},
        {"step": 40, "eval/accuracy/a": 0.5, "eval/accuracy/b": 0.55},
    ]
    run = A.load_run(write_run(tmp_path / "r", synthetic_records(40), evals))
    gains = A.eval_learning_gain(run)
    assert gains["a"] == pytest.approx(0.3) and gains["b"] == pytest.approx(-0.05)
    rg = A.reward_learning_gain(run)  # a: reward 0.01 s; last 10 steps mean - first 10 = 0.01 * 30
    assert rg["a"] == pytest.approx(0.30) and rg["b"] == pytest.approx(0.0)
    win = A.windowed_learning_gain(run, num_windows=4)
    np.testing.assert_allclose(win["a"]["reward"], [0.045, 0.145, 0.245, 0.345])
    np.testing.assert_allclose(win["a"]["gain"][1:], [0.1, 0.1, 0.1])
    assert math.isnan(win["a"]["gain"][0])
    np.testing.assert_allclose(win["a"]["sqnorm"], 9.0)
    with pytest.raises(ValueError, match="window"):
        A.reward_learning_gain(run, window=0.9)


def test_eval_records_inside_metrics_file(tmp_path):
    recs = synthetic_records(10)
    recs.insert(0, {"step": 0, "eval/accuracy/a": 0.1, "eval/accuracy/b": 0.1})
    recs.append({"step": 10, "eval/accuracy/a": 0.4, "eval/accuracy/b": 0.0})
    run = A.load_run(write_run(tmp_path / "r", recs))
    assert len(run.steps) == 10
    assert A.eval_learning_gain(run) == {"a": pytest.approx(0.3), "b": pytest.approx(-0.1)}


def test_cosine_matrix_either_key_order(tmp_path):
    recs = [
        {"step": s, "grad_norm/a": 1.0, "grad_norm/b": 1.0, "grad_norm/c": 1.0, "cos/a/b": 0.5, "cos/c/b": -0.2 - 0.2 * s}
        for s in range(3)
    ]
    run = A.load_run(write_run(tmp_path / "r", recs))
    mat = A.cosine_matrix(run)
    assert mat[0, 1] == mat[1, 0] == pytest.approx(0.5)
    assert mat[1, 2] == pytest.approx(-0.4)
    assert math.isnan(mat[0, 2])
    np.testing.assert_allclose(np.diag(mat), 1.0)


def test_comparison_table(tmp_path):
    base = write_run(
        tmp_path / "sum",
        synthetic_records(10),
        [{"step": 0, "eval/accuracy/a": 0.1, "eval/accuracy/b": 0.3}, {"step": 10, "eval/accuracy/a": 0.6, "eval/accuracy/b": 0.2}],
        {"method": "sum"},
    )
    recs = synthetic_records(10)
    for r in recs:
        r["update_share/a"], r["update_share/b"] = 0.5, 0.5
    other = write_run(
        tmp_path / "normalize",
        recs,
        [{"step": 0, "eval/accuracy/a": 0.1, "eval/accuracy/b": 0.3}, {"step": 10, "eval/accuracy/a": 0.4, "eval/accuracy/b": 0.5}],
        {"method": "normalize", "train_seconds": 3.0},
    )
    rows = A.comparison_table(A.load_runs([base, other]))
    assert rows[0]["method"] == "sum" and rows[1]["method"] == "normalize"
    assert rows[0]["mean acc"] == pytest.approx(0.4)
    assert (rows[0]["worst task"], rows[0]["worst acc"]) == ("b", pytest.approx(0.2))
    assert (rows[1]["worst task"], rows[1]["worst acc"]) == ("a", pytest.approx(0.4))
    assert rows[0]["‖g‖² ratio"] == pytest.approx(9.0)
    assert rows[0]["share ratio"] == pytest.approx(4.0) and rows[1]["share ratio"] == pytest.approx(1.0)
    assert rows[0]["s/step"] == pytest.approx(0.5)  # time stamps 0.5 s apart
    assert rows[1]["s/step"] == pytest.approx(0.3)  # run.json train_seconds / steps
    table = A.markdown_table(rows)
    assert table.count("\n") == 4 and "| sum |" in table


def test_duplicate_run_names_made_unique(tmp_path):
    a = write_run(tmp_path / "x" / "run", synthetic_records(3))
    b = write_run(tmp_path / "y" / "run", synthetic_records(3))
    assert [r.name for r in A.load_runs([a, b])] == ["run", "run#2"]


def test_repeated_step_keeps_last(tmp_path, caplog):
    recs = synthetic_records(3)
    again = dict(recs[1], **{"grad_norm/a": 7.0})
    run = A.load_run(write_run(tmp_path / "r", recs + [again]))
    assert run.steps.tolist() == [0, 1, 2]
    assert run.series("grad_norm/a").tolist() == [3.0, 7.0, 3.0]
    assert "logged again" in caplog.text


# ------------------------------------------------------------------------------ load errors
def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in run folder"):
        A.load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        A.load_run(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no run given"):
        A.load_runs([])


def test_malformed_line_names_file_and_line(tmp_path):
    folder = write_run(tmp_path / "r", synthetic_records(3))
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write("\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:5: malformed JSON"):
        A.load_run(folder)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"step": "x", "grad_norm/a": 1.0}, r"metrics\.jsonl:2: 'step' must be an integer"),
        ({"grad_norm/a": 1.0}, r"metrics\.jsonl:2: 'step' must be an integer, got None"),
        ({"step": 1.5, "grad_norm/a": 1.0}, r":2: 'step' must be an integer"),
        ({"step": 1, "grad_norm/a": "big"}, r"metrics\.jsonl:2: 'grad_norm/a' must be a number or null"),
        ({"step": 1, "reward/a/mean": True}, r":2: 'reward/a/mean' must be a number"),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, bad, message):
    folder = write_run(tmp_path / "r", [synthetic_records(1)[0], bad])
    with pytest.raises(ValueError, match=message):
        A.load_run(folder)


def test_bad_eval_file_named(tmp_path):
    folder = write_run(tmp_path / "r", synthetic_records(2), [{"step": 0, "eval/accuracy/a": "high"}])
    with pytest.raises(ValueError, match=r"eval\.jsonl:1: 'eval/accuracy/a'"):
        A.load_run(folder)


def test_log_without_task_norms_rejected(tmp_path):
    folder = write_run(tmp_path / "r", [{"step": 0, "loss": 1.0, "grad_norm/total": 2.0}])
    with pytest.raises(ValueError, match=r"metrics\.jsonl: no per-task gradient norm"):
        A.load_run(folder)


def test_null_values_are_missing(tmp_path):
    recs = synthetic_records(4)
    recs[2]["grad_norm/b"] = None
    run = A.load_run(write_run(tmp_path / "r", recs))
    assert np.isnan(run.series("grad_norm/b")[2])
    assert A.task_gradient_table(run)[1]["steps present"] == 3


# ----------------------------------------------------------------------------------- report
SECTIONS = [
    "## Findings",
    "## Runs compared",
    "## Per-task gradients",
    "## Gradient norm over steps",
    "## Update share",
    "## Task-gradient cosines",
    "## Learning gain vs gradient norm",
    "## Correlation with training statistics",
]


def test_report_sections_plots_and_findings(tmp_path):
    evals = [{"step": 0, "eval/accuracy/a": 0.2, "eval/accuracy/b": 0.2}, {"step": 20, "eval/accuracy/a": 0.3, "eval/accuracy/b": 0.6}]
    base = write_run(tmp_path / "sum", synthetic_records(20), evals, {"method": "sum", "eval_rows_per_task": 64})
    norm = write_run(tmp_path / "normalize", synthetic_records(20, seed=1), evals, {"method": "normalize"})
    out = tmp_path / "report"
    path = A.write_report(A.load_runs([base, norm]), out)
    text = path.read_text()
    for section in SECTIONS:
        assert section in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["grad_norms.png", "norm_ratio.png", "update_share.png", "cosine.png", "learning_gain.png", "paper_gain.png", "accuracy.png"])
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert f"]({p.name})" in text
    # known findings: a has 9x the squared norm of b, noise-corrected 4x; b (small gradient) gained most
    assert "task `a` has the largest mean squared gradient norm, 9.0×" in text
    assert "ratio is 4.0×" in text
    assert "ranks 2 of 2 by gain" in text and "consistent with the paper" in text
    assert "`normalize` vs `sum`" in text
    assert "standard error of 0.062" in text


def test_report_states_disagreement_with_paper(tmp_path):
    # a: largest gradient AND largest gain; reward tracks the gradient norm exactly
    recs = []
    for s in range(20):
        ga = 2.0 + 0.1 * s
        recs.append({"step": s, "grad_norm/a": ga, "grad_norm/b": 1.0 + 0.01 * s, "reward/a/mean": ga, "reward/b/mean": 1.0 + 0.01 * s})
    evals = [{"step": 0, "eval/accuracy/a": 0.1, "eval/accuracy/b": 0.1}, {"step": 20, "eval/accuracy/a": 0.9, "eval/accuracy/b": 0.2}]
    path = A.write_report(A.load_runs([write_run(tmp_path / "r", recs, evals)]), tmp_path / "out")
    text = path.read_text()
    assert "disagrees with the paper" in text
    assert "**is** largely explained by a training statistic" in text
    assert "accuracy.png" in text


def test_report_without_evals_or_statistics(tmp_path):
    recs = [{"step": s, "grad_norm/a": 1.0, "grad_norm/b": 1.1} for s in range(5)]
    path = A.write_report([A.load_run(write_run(tmp_path / "r", recs))], tmp_path / "out")
    text = path.read_text()
    for section in SECTIONS:
        assert section in text
    assert "no strong imbalance" in text
    assert "_(no reward/advantage/length statistics logged)_" in text
    assert not (tmp_path / "out" / "accuracy.png").exists()


def test_zero_gradient_task_left_out_of_ratios_and_named(tmp_path):
    recs = [
        {"step": s, "grad_norm/a": 2.0, "grad_norm/b": 1.0, "grad_norm/z": 0.0, "update_share/a": 0.8, "update_share/b": 0.2, "update_share/z": 0.0}
        for s in range(6)
    ]
    run = A.load_run(write_run(tmp_path / "sum", recs, meta={"method": "sum"}))
    assert A.zero_gradient_tasks(run) == ["z"]
    assert A.sqnorm_ratio(run) == (pytest.approx(4.0), "a", "b")
    assert A.comparison_table([run])[0]["share ratio"] == pytest.approx(4.0)
    np.testing.assert_allclose(A.norm_ratio_series(run), 2.0)  # zero norms are not a ratio's denominator
    text = A.write_report([run], tmp_path / "out").read_text()
    assert "task(s) `z` had a zero gradient at every step" in text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.floats(-100, 100), st.just(float("nan"))), min_size=1, max_size=30), st.integers(1, 6))
def test_rolling_mean_matches_reference(values, window):
    v = np.array(values, dtype=float)
    got = A.rolling_mean(v, window)
    for i in range(len(v)):
        chunk = v[max(0, i + 1 - window) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            assert got[i] == pytest.approx(chunk.mean(), abs=1e-9)
        else:
            assert np.isnan(got[i])


def test_gain_differences_within_eval_noise_are_not_a_verdict(tmp_path):
    recs = [{"step": s, "grad_norm/a": 3.0, "grad_norm/b": 1.0, "grad_norm/c": 0.5} for s in range(5)]
    meta = {"method": "sum", "eval_rows_per_task": 100}  # standard error 0.05
    small = [{"step": 0, "eval/accuracy/a": 0.5, "eval/accuracy/b": 0.5, "eval/accuracy/c": 0.5},
             {"step": 5, "eval/accuracy/a": 0.53, "eval/accuracy/b": 0.48, "eval/accuracy/c": 0.5}]
    text = A.write_report([A.load_run(write_run(tmp_path / "r1", recs, small, meta))], tmp_path / "o1").read_text()
    assert "No task's held-out accuracy moved by more than the eval's standard error (~0.050)" in text
    close = [small[0], {"step": 5, "eval/accuracy/a": 0.64, "eval/accuracy/b": 0.6, "eval/accuracy/c": 0.5}]
    text = A.write_report([A.load_run(write_run(tmp_path / "r2", recs, close, meta))], tmp_path / "o2").read_text()
    assert "by less than the eval's standard error (~0.050): no evidence either way" in text
    clear = [small[0], {"step": 5, "eval/accuracy/a": 0.8, "eval/accuracy/b": 0.6, "eval/accuracy/c": 0.5}]
    text = A.write_report([A.load_run(write_run(tmp_path / "r3", recs, clear, meta))], tmp_path / "o3").read_text()
    assert "disagrees with the paper" in text
