"""Runs grouped across seeds and compared with the baseline prompt by prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from balancedmix.comparison import compare_groups, comparison_rows, load_scores, verdict_sentences, write_eval_scores
from balancedmix.significance import paired_comparison

PROMPTS = {"add": [f"{i}+1=" for i in range(60)], "rev": [f"rev {i}:" for i in range(60)]}


def _run(tmp: Path, name: str, seed: int, acc: dict[str, np.ndarray], prompts: dict = PROMPTS) -> Path:
    d = tmp / f"{name}-{seed}"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"name": name, "seed": seed}))
    write_eval_scores(d, prompts, {t: {"accuracy": a.tolist()} for t, a in acc.items()})
    return d


def test_groups_pair_by_seed_and_prompt(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = {s: {t: (rng.random(60) < 0.4).astype(float) for t in PROMPTS} for s in (0, 1, 2)}
    better = {s: {t: np.maximum(base[s][t], (rng.random(60) < 0.3).astype(float)) for t in PROMPTS} for s in (0, 1, 2)}
    dirs = [_run(tmp_path, "sum", s, base[s]) for s in (0, 1, 2)] + [_run(tmp_path, "normalize", s, better[s]) for s in (2, 0, 1)]
    cmp = compare_groups([load_scores(d) for d in dirs], baseline="sum")
    ref = paired_comparison({t: [better[s][t] for s in (0, 1, 2)] for t in PROMPTS}, {t: [base[s][t] for s in (0, 1, 2)] for t in PROMPTS})
    assert cmp["normalize"].mean == ref.mean and cmp["normalize"].tasks == ref.tasks
    assert cmp["normalize"].mean.verdict == "better"
    (line,) = verdict_sentences(cmp, "sum")
    assert "3 seeds" in line and "**better**" in line
    rows = comparison_rows(cmp)
    assert [r["task"] for r in rows] == ["mean", "worst task", "add", "rev"]


def test_different_prompts_are_refused(tmp_path: Path) -> None:
    acc = {t: np.ones(60) for t in PROMPTS}
    other = {"add": [f"{i}+2=" for i in range(60)], "rev": PROMPTS["rev"]}
    dirs = [_run(tmp_path, "sum", 0, acc), _run(tmp_path, "pcgrad", 0, acc, other)]
    with pytest.raises(ValueError, match="different prompts"):
        compare_groups([load_scores(d) for d in dirs], baseline="sum")


def test_missing_baseline_or_shared_seed_is_named(tmp_path: Path) -> None:
    acc = {t: np.ones(60) for t in PROMPTS}
    dirs = [_run(tmp_path, "sum", 0, acc), _run(tmp_path, "pcgrad", 1, acc)]
    scores = [load_scores(d) for d in dirs]
    with pytest.raises(ValueError, match="no run named 'mean'"):
        compare_groups(scores, baseline="mean")
    with pytest.raises(ValueError, match="shares no seed"):
        compare_groups(scores, baseline="sum")


def test_duplicate_seed_and_length_mismatch(tmp_path: Path) -> None:
    acc = {t: np.ones(60) for t in PROMPTS}
    a = _run(tmp_path, "sum", 0, acc)
    b = tmp_path / "copy"
    b.mkdir()
    (b / "run.json").write_text(json.dumps({"name": "sum", "seed": 0}))
    write_eval_scores(b, PROMPTS, {t: {"accuracy": v.tolist()} for t, v in acc.items()})
    with pytest.raises(ValueError, match="two runs named 'sum' with seed 0"):
        compare_groups([load_scores(a), load_scores(b)], baseline="sum")
    with pytest.raises(ValueError, match="59 accuracy scores for 60 prompts"):
        write_eval_scores(b, PROMPTS, {"add": {"accuracy": [1.0] * 59}})


def test_folder_without_scores_is_none(tmp_path: Path) -> None:
    assert load_scores(tmp_path) is None


def _metrics(folder: Path) -> None:
    rec = {"grad_norm/add": 1.0, "grad_norm/rev": 2.0, "reward/add/mean": 0.5, "reward/rev/mean": 0.5}
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **rec}) + "\n" for s in range(1, 4)))


def test_report_decision_section_uses_every_seed(tmp_path: Path) -> None:
    from balancedmix import analysis as A

    rng = np.random.default_rng(1)
    dirs = []
    for seed in (0, 1, 2):
        base = {t: (rng.random(60) < 0.3).astype(float) for t in PROMPTS}
        dirs.append(_run(tmp_path, "sum", seed, base))
        dirs.append(_run(tmp_path, "normalize", seed, {t: np.ones(60) for t in PROMPTS}))
    for d in dirs:
        _metrics(d)
    runs = A.load_runs(dirs)
    text = A.write_report(runs, tmp_path / "out").read_text()
    decision = text.split("## Decision")[1].split("## Findings")[0]
    assert "`normalize` vs `sum` (3 seeds, paired per prompt, 95 % intervals)" in decision
    assert "**better**" in decision and "| normalize | worst task |" in decision
    assert "3 seeds: the figures in this section are the first seed's" in text
    # the per-run sections (per-task gradients, correlations) show one run per name: the first seed's
    assert text.count("\n**sum**\n") == 2 and "**sum#2**" not in text and "**normalize#3**" not in text


def test_report_without_scores_has_no_decision(tmp_path: Path) -> None:
    from balancedmix import analysis as A

    d = tmp_path / "r"
    d.mkdir()
    _metrics(d)
    assert "## Decision" not in A.write_report([A.load_run(d)], tmp_path / "out").read_text()


@pytest.mark.parametrize("seeds,seed,match", [(0, 0, "seeds must be a positive integer"), (True, 0, "seeds must be"), (3, 2**32 - 2, "run past 2\\*\\*32")])
def test_demo_seeds_are_checked_before_work(tmp_path: Path, seeds: object, seed: int, match: str) -> None:
    from balancedmix.demo.run import check_demo_args

    with pytest.raises(ValueError, match=match):
        check_demo_args(tmp_path / "d", seed=seed, seeds=seeds)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_demo_cli_refuses_zero_seeds(tmp_path: Path) -> None:
    from balancedmix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "d"), "--seeds", "0"])
    assert exc.value.code == 2
