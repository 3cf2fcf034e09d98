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
