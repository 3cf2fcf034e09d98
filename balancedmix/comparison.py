"""Runs grouped by name across seeds, compared with the baseline prompt by prompt.

A run folder that holds ``eval_scores.json`` (written by ``balancedmix demo``, or by any script
through :func:`write_eval_scores`) can be compared with paired intervals
(:mod:`balancedmix.significance`). Runs are grouped by their ``run.json`` ``name`` (the folder's
name otherwise); seeds are matched by ``run.json``'s ``seed``; prompts are matched by position and
checked with a fingerprint of the prompt texts, so two runs evaluated on different prompts are
refused instead of being compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .significance import PairedComparison, PairedInterval, paired_comparison

SCORES_FILE = "eval_scores.json"

__all__ = [
    "SCORES_FILE",
    "RunScores",
    "prompt_fingerprint",
    "write_eval_scores",
    "load_scores",
    "compare_groups",
    "verdict_sentences",
    "comparison_rows",
]


def prompt_fingerprint(prompts: Sequence[str]) -> str:
    """A short hash of an ordered list of prompts (pairing check between runs)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def write_eval_scores(
    run_dir: str | os.PathLike[str],
    prompts: Mapping[str, Sequence[str]],
    after: Mapping[str, Mapping[str, Sequence[float]]],
    before: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> Path:
    """Write ``run_dir/eval_scores.json``.

    Args:
        prompts: ``{task: [prompt, …]}`` in the order of the scores.
        after, before: ``{task: {metric: [score per prompt]}}`` (``metric``: ``accuracy``,
            ``reward``, …) after and, optionally, before training.
    """
    for task, per_metric in after.items():
        for metric, values in per_metric.items():
            if len(values) != len(prompts.get(task, ())):
                raise ValueError(f"task {task!r}: {len(values)} {metric} scores for {len(prompts.get(task, ()))} prompts")
    payload = {
        "prompts": {t: prompt_fingerprint(p) for t, p in prompts.items()},
        "after": {t: {m: [float(x) for x in v] for m, v in s.items()} for t, s in after.items()},
    }
    if before is not None:
        payload["before"] = {t: {m: [float(x) for x in v] for m, v in s.items()} for t, s in before.items()}
    path = Path(run_dir) / SCORES_FILE
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


@dataclass(frozen=True)
class RunScores:
    """One run's per-prompt held-out scores. ``after[task][metric]`` is a list over prompts."""

    name: str
    seed: int | None
    path: Path
    prompts: dict[str, str]
    after: dict[str, dict[str, list[float]]]


def load_scores(run_dir: str | os.PathLike[str]) -> RunScores | None:
    """The run's per-prompt scores, or ``None`` when the folder has no ``eval_scores.json``."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    path = run_dir / SCORES_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta_path = run_dir / "run.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    seed = meta.get("seed")
    return RunScores(
        name=str(meta.get("name", run_dir.name)),
        seed=int(seed) if seed is not None else None,
        path=run_dir,
        prompts=dict(data["prompts"]),
        after={t: {m: list(v) for m, v in s.items()} for t, s in data["after"].items()},
    )


def _group(scores: Sequence[RunScores]) -> dict[str, dict[int | None, RunScores]]:
    groups: dict[str, dict[int | None, RunScores]] = {}
    for s in scores:
        by_seed = groups.setdefault(s.name, {})
        if s.seed in by_seed:
            raise ValueError(f"two runs named {s.name!r} with seed {s.seed}: {by_seed[s.seed].path} and {s.path}")
        by_seed[s.seed] = s
    return groups


def compare_groups(
    scores: Sequence[RunScores], baseline: str, metric: str = "accuracy", level: float = 0.95
) -> dict[str, PairedComparison]:
    """Every other run name against ``baseline``, paired by seed and prompt.

    Only seeds present in both groups are used. Raises ``ValueError`` when the baseline is missing,
    when no seed is shared, or when the two runs were evaluated on different prompts.
    """
    groups = _group(scores)
    if baseline not in groups:
        raise ValueError(f"no run named {baseline!r} among {sorted(groups)}")
    base = groups[baseline]
    out: dict[str, PairedComparison] = {}
    for name, runs in groups.items():
        if name == baseline:
            continue
        seeds = sorted((s for s in runs if s in base), key=lambda s: (s is None, s))
        if not seeds:
            raise ValueError(f"run {name!r} shares no seed with the baseline {baseline!r}")
        tasks = list(base[seeds[0]].after)
        treated: dict[str, list[list[float]]] = {t: [] for t in tasks}
        reference: dict[str, list[list[float]]] = {t: [] for t in tasks}
        for seed in seeds:
            a, b = runs[seed], base[seed]
            if a.prompts != b.prompts:
                raise ValueError(
                    f"{a.path} and {b.path} were evaluated on different prompts (fingerprints {a.prompts} vs "
                    f"{b.prompts}); a paired comparison needs the same held-out set"
                )
            for t in tasks:
                treated[t].append(a.after[t][metric])
                reference[t].append(b.after[t][metric])
        out[name] = paired_comparison(treated, reference, level=level)
    return out


def verdict_sentences(comparisons: Mapping[str, PairedComparison], baseline: str) -> list[str]:
    """One plain sentence per compared run: mean and worst-task difference, interval, verdict."""
    def says(iv: PairedInterval, what: str) -> str:
        if iv.verdict == "undecided":
            return f"{what} {iv.describe()}: no evidence either way"
        return f"{what} {iv.describe()}: **{iv.verdict}** than `{baseline}`"

    lines = []
    for name, cmp in comparisons.items():
        m, w = cmp.mean, cmp.worst
        seeds = f"{m.seeds} seed{'s' if m.seeds != 1 else ''}"
        caveat = " (one seed: the interval covers evaluation noise only, not training randomness)" if m.seeds == 1 else ""
        lines.append(
            f"`{name}` vs `{baseline}` ({seeds}, paired per prompt, {round(100 * m.level)} % intervals): "
            f"{says(m, 'mean accuracy')}; {says(w, 'worst-task accuracy')}{caveat}."
        )
    return lines


def comparison_rows(comparisons: Mapping[str, PairedComparison]) -> list[dict[str, str]]:
    """Table rows: run, task (``mean``, ``worst``, then each task), difference [interval], verdict."""
    rows = []
    for name, cmp in comparisons.items():
        for label, iv in [("mean", cmp.mean), ("worst task", cmp.worst), *cmp.tasks.items()]:
            rows.append(
                {
                    "run": name,
                    "task": label,
                    f"Δ accuracy [{round(100 * iv.level)} % CI]": iv.describe(),
                    "verdict": iv.verdict,
                    "seeds": str(iv.seeds),
                }
            )
    return rows
