"""The paper's analyses on the JSONL logs of balancedmix runs: tables, plots and ``report.md``.

Works on any run that wrote a balancedmix JSONL log (the demo's, the TRL integration's, or a
plain loop with ``BalancedOptimizer(..., on_step=JSONLLogger(path))``). A *run* is a folder
holding ``metrics.jsonl`` (one line per optimizer step) and optionally ``eval.jsonl`` (held-out
evaluations, keys ``eval/accuracy/<task>``; the first record is "before", the last "after") and
``run.json`` (free-form metadata: ``method``, ``schedule``...). A path to a ``.jsonl`` file works
too. Records of ``metrics.jsonl`` that carry ``eval/...`` keys count as evaluations.

Keys read (all optional except ``step`` and ``grad_norm/<task>``): ``grad_norm/<task>``,
``grad_norm_unbiased/<task>``, ``grad_sqnorm_unbiased/<task>``, ``update_share/<task>``,
``coef/<task>``, ``cos/<a>/<b>``, ``reward/<task>/mean``, ``reward/<task>/std``,
``advantage/<task>/abs_mean``, ``completion_length/<task>/mean``, ``num_samples/<task>``,
``time`` (seconds since the epoch, written by :class:`~balancedmix.logger.JSONLLogger`).

Definitions (units: gradient norms are L2 norms of the task's summed gradient in the
parameters' units per loss unit; ratios are dimensionless):

- *squared-norm ratio* of a run: ``max_t mean_s ‖g_t,s‖² / min_t mean_s ‖g_t,s‖²`` over steps
  ``s`` (the paper's "up to 33× larger squared gradient norm"); the *noise-corrected* ratio uses
  the split-half unbiased estimate ``grad_sqnorm_unbiased/<task>`` instead of ``‖g‖²``.
- *norm ratio at a step*: ``max_t ‖g_t‖ / min_t ‖g_t‖`` over the tasks present at that step.
- *reward learning gain* of a task (the paper's definition): increase of its mean training
  reward over a window of steps — ``mean(last window) − mean(first window)``, windows a quarter
  of the run by default; *eval learning gain*: held-out accuracy after − before.
- correlations: Pearson and Spearman (average ranks for ties) between ``grad_norm/<task>`` and a
  training statistic over the steps where both are finite, per task and pooled over all
  (task, step) pairs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .comparison import load_scores
from .logger import scan_jsonl
from .significance import windowed_gain
from .tasks import RESERVED_TASK_NAMES

__all__ = [
    "Run",
    "INCOMPLETE_MARKER",
    "load_run",
    "load_runs",
    "STATISTICS",
    "pearson",
    "spearman",
    "norm_ratio_series",
    "rolling_mean",
    "sqnorm_ratio",
    "zero_gradient_tasks",
    "task_gradient_table",
    "signal_noise_table",
    "paper_gain_series",
    "default_gain_window",
    "cosine_matrix",
    "reward_learning_gain",
    "windowed_learning_gain",
    "eval_learning_gain",
    "correlations",
    "comparison_table",
    "markdown_table",
    "write_plots",
    "write_report",
]

logger = logging.getLogger(__name__)

#: training statistics correlated with the gradient norm: {label: key template}
STATISTICS: dict[str, str] = {
    "reward": "reward/{task}/mean",
    "abs advantage": "advantage/{task}/abs_mean",
    "reward std": "reward/{task}/std",
    "completion length": "completion_length/{task}/mean",
}

_NUMERIC_PREFIXES = (
    "grad_norm/",
    "grad_norm_unbiased/",
    "grad_sqnorm_unbiased/",
    "update_share/",
    "coef/",
    "cos/",
    "reward/",
    "advantage/",
    "completion_length/",
    "num_samples/",
    "num_microbatches/",
    "noise_trace/",
    "noise_scale/",
    "eval/",
)
_NOT_TASKS = RESERVED_TASK_NAMES  # grad_norm/total, /update, /untagged are not tasks

#: a file of this name in a run folder marks a run that has not finished (the demo writes it
#: when a run starts and removes it when the run is complete); the report flags such runs
INCOMPLETE_MARKER = "INCOMPLETE"


# ---------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """One run's log.

    Attributes:
        name: label used in tables and plots.
        path: the metrics file.
        steps: sorted optimizer steps, ``int64 [S]``.
        records: one dict per step (same order as ``steps``); missing values are absent.
        evals: evaluation records in file order (first = before training, last = after).
        tasks: task names, in order of first appearance in ``grad_norm/<task>`` keys.
        meta: contents of ``run.json`` (empty when absent).
        problems: what is wrong with the log but did not stop it from loading (a torn line
            set aside, an unfinished run, a file split into several runs); each was logged as
            a warning and the report lists them.
        scores: per-prompt held-out scores (``eval_scores.json``,
            :class:`balancedmix.comparison.RunScores`) or ``None``.
    """

    name: str
    path: Path
    steps: np.ndarray
    records: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    tasks: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    scores: Any = None

    def series(self, key: str) -> np.ndarray:
        """``float64 [S]``: the key's value at every step, NaN where missing or null."""
        return np.array([_as_float(r.get(key)) for r in self.records], dtype=np.float64)

    def has(self, key: str) -> bool:
        return any(r.get(key) is not None for r in self.records)

    @property
    def method(self) -> str:
        return str(self.meta.get("method", self.name))

    def time_per_step(self) -> float:
        """Mean wall seconds per optimizer step from the ``time`` stamps (NaN with < 2 steps).

        ``run.json``'s ``train_seconds`` / number of steps when present (excludes set-up)."""
        if "train_seconds" in self.meta and len(self.steps):
            return float(self.meta["train_seconds"]) / len(self.steps)
        t = self.series("time")
        t = t[np.isfinite(t)]
        if len(t) < 2:
            return float("nan")
        return float((t[-1] - t[0]) / (len(t) - 1))


def _as_float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value)


def _validated(path: Path, problems: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Records with their line numbers; bad values raise ``ValueError`` naming file:line and key.

    Torn lines (:func:`balancedmix.logger.scan_jsonl`) are left out, described in ``problems``.
    """
    scan = scan_jsonl(path)
    for torn in scan.torn:
        if problems is not None:
            problems.append(torn.describe(path))
    out = []
    for lineno, rec in zip(scan.line_numbers, scan.records):
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step != int(step):
            raise ValueError(f"{path}:{lineno}: 'step' must be an integer, got {step!r}")
        for key, value in rec.items():
            if key.startswith(_NUMERIC_PREFIXES) or key == "time":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"{path}:{lineno}: {key!r} must be a number or null, got {value!r}")
        out.append((lineno, rec))
    return out


def _tasks_of(records: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    tasks: dict[str, None] = {}
    for rec in records:
        for key in rec:
            if key.startswith("grad_norm/"):
                name = key[len("grad_norm/") :]
                if name not in _NOT_TASKS:
                    tasks.setdefault(name, None)
    return tuple(tasks)


def _segments(metrics: Path, rows: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Cut the file's records into runs: a training step at or before the first step of the
    current run starts a new run; a step inside its range is a resume redoing it (the later
    record is kept, a warning)."""
    segments: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    pending_evals: list[dict[str, Any]] = []
    for lineno, rec in rows:
        if any(k.startswith("eval/") for k in rec):
            (cur["evals"] if cur is not None else pending_evals).append(rec)
            continue
        step = int(rec["step"])
        if cur is None or step <= cur["first"]:
            cur = {"first": step, "last": step, "train": {}, "evals": [], "lines": [lineno, lineno]}
            if not segments:
                cur["evals"], pending_evals = pending_evals, []
            segments.append(cur)
        elif step <= cur["last"]:
            logger.warning("%s:%d: step %d logged again; keeping the last record", metrics, lineno, step)
        cur["train"][step] = rec
        cur["last"] = max(cur["last"], step)
        cur["lines"][1] = lineno
    if not segments:
        segments.append({"first": 0, "last": 0, "train": {}, "evals": pending_evals, "lines": [0, 0]})
    return segments


def _load(path: str | os.PathLike[str], name: str | None, split_runs: bool) -> list[Run]:
    path = Path(path)
    if path.is_dir():
        folder, metrics = path, path / "metrics.jsonl"
        if not metrics.is_file():
            inside = sorted(p.name for p in path.iterdir() if (p / "metrics.jsonl").is_file())
            hint = f"; it holds run folders ({', '.join(inside)}): pass those, e.g. {path / inside[0]}" if inside else ""
            raise FileNotFoundError(f"no metrics.jsonl in run folder {path}{hint}")
    else:
        folder, metrics = path.parent, path
        if not metrics.is_file():
            raise FileNotFoundError(f"no metrics file at {path}")
    problems: list[str] = []
    rows = _validated(metrics, problems)
    segments = _segments(metrics, rows)
    if len(segments) > 1 and not split_runs:
        desc = "; ".join(f"lines {g['lines'][0]}-{g['lines'][1]}: steps {g['first']}..{g['last']}" for g in segments)
        raise ValueError(
            f"{metrics}: holds {len(segments)} runs, not one (the step counter goes back to {segments[1]['first']} at line "
            f"{segments[1]['lines'][0]}; {desc}), e.g. a script re-run appending to the same log. Report them as separate "
            "runs with `balancedmix report --split-runs` (load_runs(..., split_runs=True)), or give each run its own file."
        )
    eval_file = folder / "eval.jsonl"
    if path.is_dir() and eval_file.is_file():
        segments[-1]["evals"].extend(rec for _, rec in _validated(eval_file, problems))
    meta: dict[str, Any] = {}
    meta_file = folder / "run.json"
    if path.is_dir() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_file}:{err.lineno}: malformed JSON ({err.msg})") from None
    if path.is_dir() and (folder / INCOMPLETE_MARKER).exists():
        problems.append(
            f"{folder}: the run did not finish (its {INCOMPLETE_MARKER} marker is still there: interrupted or crashed); "
            "its figures cover only the steps it logged"
        )
    label = name or str(meta.get("name") or (folder.name if path.is_dir() else path.stem))
    scores = load_scores(folder) if path.is_dir() else None
    runs = []
    for i, seg in enumerate(segments, start=1):
        steps = np.array(sorted(seg["train"]), dtype=np.int64)
        records = [seg["train"][int(s)] for s in steps]
        tasks = _tasks_of(records)
        if not tasks:
            where = f" (lines {seg['lines'][0]}-{seg['lines'][1]})" if len(segments) > 1 else ""
            raise ValueError(
                f"{metrics}{where}: no per-task gradient norm ('grad_norm/<task>') in any record; is this a balancedmix metrics log?"
            )
        last = i == len(segments)
        run_problems = list(problems) if last else []
        if len(segments) > 1:
            run_problems.append(
                f"{metrics}: run {i} of {len(segments)} in this file (lines {seg['lines'][0]}-{seg['lines'][1]}, steps "
                f"{seg['first']}..{seg['last']})" + ("; run.json and eval.jsonl are attached to the last run" if last else "")
            )
        seg_label = f"{label}[{i}]" if len(segments) > 1 else label
        runs.append(
            Run(
                name=seg_label,
                path=metrics,
                steps=steps,
                records=records,
                evals=seg["evals"],
                tasks=tasks,
                meta=meta if last else {},
                problems=run_problems,
                scores=scores if last else None,
            )
        )
    for run in runs:
        for problem in run.problems:
            logger.warning("%s", problem)
    return runs


def load_run(path: str | os.PathLike[str], name: str | None = None) -> Run:
    """Load a run folder (``metrics.jsonl`` [+ ``eval.jsonl``, ``run.json``]) or a JSONL file.

    Raises ``FileNotFoundError`` (no metrics file) or ``ValueError`` naming the file and line
    (malformed JSON, non-numeric metric, missing/non-integer step) or naming the file (no
    ``grad_norm/<task>`` key at all; several runs in one file).

    Two runs in one file: a training step at or before the first step of the run so far (the
    step counter going back to the start, e.g. a script re-run appending to its log) starts a
    new run, and ``load_run`` raises; :func:`load_runs` with ``split_runs=True`` loads each.
    A step inside the range already logged (a resume that redid steps) keeps its last
    record (a warning). Recoverable problems do not raise; they are logged as warnings and kept
    in :attr:`Run.problems`: a torn line (a writer killed mid-line; see
    :func:`balancedmix.logger.scan_jsonl`), or an :data:`INCOMPLETE_MARKER` file in the folder.
    """
    return _load(path, name, split_runs=False)[0]


def load_runs(paths: Sequence[str | os.PathLike[str]], split_runs: bool = False) -> list[Run]:
    """Load several runs; labels are made unique by appending ``#2``, ``#3``...

    ``split_runs=True``: a file holding several runs (see :func:`load_run`) gives one
    :class:`Run` per run, labelled ``<name>[1]``, ``<name>[2]``...; the folder's ``run.json``
    and ``eval.jsonl`` go to the last one (they were written last).
    """
    if not paths:
        raise ValueError("no run given")
    runs = [run for p in paths for run in _load(p, None, split_runs)]
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name}#{seen[run.name]}"
        else:
            seen[run.name] = 1
    return runs


# ------------------------------------------------------------------------------------ statistics
def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of the finite pairs (NaN with < 3 pairs or a constant side)."""
    x, y = _finite_pairs(x, y)
    if len(x) < 3 or np.ptp(x) == 0.0 or np.ptp(y) == 0.0:  # constant side (its mean can round off it)
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = float(np.abs(dx).max()), float(np.abs(dy).max())
    if sx == 0.0 or sy == 0.0:
        return float("nan")
    dx, dy = dx / sx, dy / sy  # rescaled so tiny spreads do not underflow when squared
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if den == 0.0:
        return float("nan")
    return float(np.clip((dx @ dy) / den, -1.0, 1.0))


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties) of the finite pairs."""
    x, y = _finite_pairs(x, y)
    if len(x) < 3:
        return float("nan")
    return pearson(_ranks(x), _ranks(y))


def _finite_pairs(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _nanmean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """``float64 [S]``: mean of the finite values among the last ``window`` steps (NaN if none)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(len(v))
    lo = np.maximum(idx + 1 - window, 0)
    cnt = ccnt[idx + 1] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (csum[idx + 1] - csum[lo]) / np.maximum(cnt, 1), np.nan)


def norm_ratio_series(run: Run, unbiased: bool = False) -> np.ndarray:
    """``float64 [S]``: ``max_t ‖g_t‖ / min_t ‖g_t‖`` per step over tasks with a finite positive norm.

    ``unbiased=True`` uses ``sqrt(grad_sqnorm_unbiased/<task>)`` (a non-positive estimate counts
    as missing). NaN at steps with fewer than two such tasks.
    """
    if unbiased:
        cols = [np.sqrt(np.where(s > 0, s, np.nan)) for s in (run.series(f"grad_sqnorm_unbiased/{t}") for t in run.tasks)]
    else:
        cols = [run.series(f"grad_norm/{t}") for t in run.tasks]
    mat = np.stack(cols, axis=1) if cols else np.zeros((len(run.steps), 0))
    mat = np.where(np.isfinite(mat) & (mat > 0), mat, np.nan)
    out = np.full(len(run.steps), np.nan)
    for i, row in enumerate(mat):
        row = row[np.isfinite(row)]
        if len(row) >= 2:
            out[i] = row.max() / row.min()
    return out


def _mean_sqnorms(run: Run, unbiased: bool) -> dict[str, float]:
    if unbiased:
        return {t: _nanmean(run.series(f"grad_sqnorm_unbiased/{t}")) for t in run.tasks}
    return {t: _nanmean(run.series(f"grad_norm/{t}") ** 2) for t in run.tasks}


def zero_gradient_tasks(run: Run) -> list[str]:
    """Tasks whose gradient norm is exactly 0 at every logged step.

    In GRPO this happens when every completion of every group of the task gets the same reward
    (no advantage): the task contributes nothing to the update. Such tasks are left out of the
    ratios (a ratio to 0 says nothing) and named in the report.
    """
    out = []
    for t in run.tasks:
        g = run.series(f"grad_norm/{t}")
        g = g[np.isfinite(g)]
        if len(g) and not np.any(g != 0):
            out.append(t)
    return out


def sqnorm_ratio(run: Run, unbiased: bool = False) -> tuple[float, str, str]:
    """``(ratio, largest task, smallest task)`` of mean squared gradient norms over the run.

    Tasks of :func:`zero_gradient_tasks` are left out. NaN ratio when fewer than two tasks
    have a finite mean, or the smallest mean is ≤ 0 (the unbiased estimate can be, when a
    task's gradient is pure noise).
    """
    zero = set(zero_gradient_tasks(run))
    means = {t: v for t, v in _mean_sqnorms(run, unbiased).items() if math.isfinite(v) and t not in zero}
    if len(means) < 2:
        return float("nan"), "", ""
    hi = max(means, key=means.__getitem__)
    lo = min(means, key=means.__getitem__)
    if means[lo] <= 0:
        return float("nan"), hi, lo
    return means[hi] / means[lo], hi, lo


def task_gradient_table(run: Run) -> list[dict[str, Any]]:
    """Per task: mean ‖g‖, mean ‖g‖², mean unbiased ‖g‖² estimate, mean update share, mean coefficient."""
    rows = []
    for t in run.tasks:
        g = run.series(f"grad_norm/{t}")
        rows.append(
            {
                "task": t,
                "mean ‖g‖": _nanmean(g),
                "mean ‖g‖²": _nanmean(g**2),
                "mean ‖g‖² unbiased": _nanmean(run.series(f"grad_sqnorm_unbiased/{t}")),
                "mean update share": _nanmean(run.series(f"update_share/{t}")),
                "mean coef": _nanmean(run.series(f"coef/{t}")),
                "steps present": int(np.isfinite(g).sum()),
            }
        )
    return rows


def signal_noise_table(run: Run) -> list[dict[str, Any]]:
    """Per task: how much of its raw squared gradient norm is sampling noise (split estimator).

    ``E‖ĝ‖² = ‖g‖² + tr Σ / n``: the raw squared norm of a mini-batch gradient holds the true
    (mean-gradient) part and a noise part. With the split-half unbiased estimate ``‖g‖²_u`` of the
    true part, the noise share is ``1 − mean ‖g‖²_u / mean ‖ĝ‖²`` over the run's steps. The
    gradient noise scale ``tr Σ / ‖g‖²`` (in samples: the batch size at which noise and signal are
    equal) is the median over steps of ``noise_scale/<task>``. ``signal resolved`` is True when the
    mean unbiased estimate exceeds twice its standard error over steps (a ratio of such tasks'
    norms measures signal; otherwise it measures noise). NaN columns when the run was logged
    without the split estimator.
    """
    rows = []
    for t in run.tasks:
        raw = run.series(f"grad_norm/{t}") ** 2
        unb = run.series(f"grad_sqnorm_unbiased/{t}")
        both = np.isfinite(raw) & np.isfinite(unb)
        if both.any():
            mean_raw, mean_unb = float(raw[both].mean()), float(unb[both].mean())
            share = 1.0 - mean_unb / mean_raw if mean_raw > 0 else float("nan")
            n = int(both.sum())
            se = float(unb[both].std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
            resolved = bool(mean_unb > 2 * se)
        else:
            share, mean_unb, resolved = float("nan"), float("nan"), False
        scale = run.series(f"noise_scale/{t}")
        scale = scale[np.isfinite(scale)]
        rows.append(
            {
                "task": t,
                "noise share of raw ‖g‖²": share,
                "noise scale (samples)": float(np.median(scale)) if len(scale) else float("nan"),
                "mean ‖g‖² unbiased": mean_unb,
                "signal resolved": resolved,
            }
        )
    return rows


def paper_gain_series(run: Run, window: int) -> dict[str, np.ndarray]:
    """Per task, the paper's ``Gain(t)`` over the run's steps (:func:`balancedmix.significance.windowed_gain`)."""
    return {t: windowed_gain(_reward_series(run, t), window) for t in run.tasks}


def default_gain_window(run: Run) -> int:
    """Our default window ``s`` for ``Gain(t)``: a tenth of the run's steps, at least 1 (the paper gives none)."""
    return max(1, len(run.steps) // 10)


def cosine_matrix(run: Run) -> np.ndarray:
    """``float64 [K, K]`` mean over steps of ``cos/<a>/<b>`` (either key order), 1 on the diagonal."""
    k = len(run.tasks)
    mat = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = run.tasks[i], run.tasks[j]
            s = run.series(f"cos/{a}/{b}")
            s2 = run.series(f"cos/{b}/{a}")
            s = np.where(np.isfinite(s), s, s2)
            mat[i, j] = mat[j, i] = _nanmean(s)
    return mat


def _reward_series(run: Run, task: str) -> np.ndarray:
    return run.series(f"reward/{task}/mean")


def reward_learning_gain(run: Run, window: float = 0.25) -> dict[str, float]:
    """Per task: mean training reward over the last ``window`` of its steps − over the first.

    ``window`` is a fraction of the task's logged steps (at least one step). NaN when the task
    has no reward logged or fewer than two steps with a reward.
    """
    if not 0 < window <= 0.5:
        raise ValueError(f"window must be in (0, 0.5], got {window}")
    out = {}
    for t in run.tasks:
        r = _reward_series(run, t)
        r = r[np.isfinite(r)]
        if len(r) < 2:
            out[t] = float("nan")
            continue
        w = max(1, int(round(window * len(r))))
        out[t] = float(r[-w:].mean() - r[:w].mean())
    return out


def windowed_learning_gain(run: Run, num_windows: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """The paper's central figure's data: per task and window of steps, the mean ‖g‖² and the gain.

    The run's steps are split into ``num_windows`` contiguous windows of (nearly) equal size.
    Returns ``{task: {"step": [W] window mid-steps, "sqnorm": [W] mean ‖g‖², "reward": [W] mean
    reward, "gain": [W] reward(w) − reward(w−1) (NaN for w = 0)}}``.
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    n = len(run.steps)
    bounds = np.linspace(0, n, min(num_windows, max(n, 1)) + 1).round().astype(int)
    out: dict[str, dict[str, np.ndarray]] = {}
    for t in run.tasks:
        g2 = run.series(f"grad_norm/{t}") ** 2
        r = _reward_series(run, t)
        mids, sq, rew = [], [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi <= lo:
                continue
            mids.append(float(run.steps[lo:hi].mean()))
            sq.append(_nanmean(g2[lo:hi]))
            rew.append(_nanmean(r[lo:hi]))
        rew_a = np.array(rew)
        gain = np.concatenate([[np.nan], np.diff(rew_a)]) if len(rew_a) else rew_a
        out[t] = {"step": np.array(mids), "sqnorm": np.array(sq), "reward": rew_a, "gain": gain}
    return out


def _eval_values(record: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    return {t: _as_float(record.get(f"eval/accuracy/{t}")) for t in tasks}


def eval_accuracy(run: Run, which: str = "after") -> dict[str, float]:
    """Held-out accuracy per task from the first (``"before"``) or last (``"after"``) eval record."""
    if which not in ("before", "after"):
        raise ValueError(f"which must be 'before' or 'after', got {which!r}")
    if not run.evals:
        return {t: float("nan") for t in run.tasks}
    return _eval_values(run.evals[0] if which == "before" else run.evals[-1], run.tasks)


def eval_learning_gain(run: Run) -> dict[str, float]:
    """Held-out accuracy after − before per task (NaN without two eval records)."""
    if len(run.evals) < 2:
        return {t: float("nan") for t in run.tasks}
    before, after = eval_accuracy(run, "before"), eval_accuracy(run, "after")
    return {t: after[t] - before[t] for t in run.tasks}


def correlations(run: Run) -> list[dict[str, Any]]:
    """Correlation of ``grad_norm/<task>`` with each statistic of :data:`STATISTICS`.

    One row per (scope, statistic) with scope a task name or ``"pooled"`` (all tasks' (step,
    value) pairs together: this is the one that can explain *between-task* differences): keys
    ``scope, statistic, n, pearson, spearman``. Statistics that no task logs are left out.
    """
    rows: list[dict[str, Any]] = []
    for label, template in STATISTICS.items():
        if not any(run.has(template.format(task=t)) for t in run.tasks):
            continue
        xs, ys = [], []
        for t in run.tasks:
            x = run.series(f"grad_norm/{t}")
            y = run.series(template.format(task=t))
            fx, fy = _finite_pairs(x, y)
            xs.append(fx)
            ys.append(fy)
            rows.append({"scope": t, "statistic": label, "n": len(fx), "pearson": pearson(fx, fy), "spearman": spearman(fx, fy)})
        px, py = np.concatenate(xs), np.concatenate(ys)
        rows.append({"scope": "pooled", "statistic": label, "n": len(px), "pearson": pearson(px, py), "spearman": spearman(px, py)})
    return rows


def comparison_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Side-by-side summary, one row per run.

    Keys: ``run``, ``method``, ``steps``, ``acc/<task>`` (final held-out accuracy, NaN without
    evals), ``mean acc``, ``worst task``, ``worst acc``, ``‖g‖² ratio`` (raw squared-norm ratio),
    ``‖g‖² ratio unbiased``, ``share ratio`` (max/min mean update share over tasks, NaN when a
    mean share is ≤ 0; tasks of :func:`zero_gradient_tasks` left out), ``s/step``.
    """
    tasks: list[str] = []
    for run in runs:
        tasks.extend(t for t in run.tasks if t not in tasks)
    rows = []
    for run in runs:
        acc = eval_accuracy(run, "after")
        row: dict[str, Any] = {"run": run.name, "method": run.method, "steps": len(run.steps)}
        for t in tasks:
            row[f"acc/{t}"] = acc.get(t, float("nan"))
        finite = {t: v for t, v in acc.items() if math.isfinite(v)}
        row["mean acc"] = float(np.mean(list(finite.values()))) if finite else float("nan")
        worst = min(finite, key=finite.__getitem__) if finite else ""
        row["worst task"] = worst
        row["worst acc"] = finite.get(worst, float("nan"))
        row["‖g‖² ratio"] = sqnorm_ratio(run)[0]
        row["‖g‖² ratio unbiased"] = sqnorm_ratio(run, unbiased=True)[0]
        zero = set(zero_gradient_tasks(run))
        shares = [_nanmean(run.series(f"update_share/{t}")) for t in run.tasks if t not in zero]
        shares = [s for s in shares if math.isfinite(s)]
        row["share ratio"] = max(shares) / min(shares) if len(shares) >= 2 and min(shares) > 0 else float("nan")
        row["s/step"] = run.time_per_step()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ formatting
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 10 ** (-digits)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub markdown table of ``rows`` (dicts), columns in the first row's order by default."""
    if not rows:
        return "_(no data)_\n"
    cols = list(columns or rows[0].keys())
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(_fmt(r.get(c, ""), digits)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- plots
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _figure(ncols: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=90)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _task_colors(runs: Sequence[Run]) -> dict[str, str]:
    tasks: list[str] = []
    for run in runs:
        tasks.extend(t for t in run.tasks if t not in tasks)
    return {t: _COLORS[i % len(_COLORS)] for i, t in enumerate(tasks)}


def _log_scale(ax: Any, axis: str = "y") -> None:
    """Log scale on ``axis`` when the plotted data hold a positive finite value (else linear)."""
    values: list[float] = []
    pairs = [np.column_stack([np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)]) for ln in ax.get_lines()]
    pairs += [np.asarray(c.get_offsets(), float).reshape(-1, 2) for c in ax.collections]
    for xy in pairs:
        xy = xy[np.isfinite(xy).all(axis=1)]  # only points that are drawn
        values.extend(xy[:, 0 if axis == "x" else 1].tolist())
    v = np.asarray(values, dtype=float)
    if np.any(np.isfinite(v) & (v > 0)):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _legend(ax: Any, **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kw)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_plots(
    runs: Sequence[Run], out: str | os.PathLike[str], gain_window: int | None = None, seed_runs: Sequence[Run] | None = None
) -> dict[str, Path]:
    """Write the report's PNGs into ``out``; returns ``{figure name: path}``.

    Figures: ``grad_norms`` (per-task ‖g‖ over steps, raw solid, noise-corrected dashed),
    ``norm_ratio`` (max/min ratio over steps), ``update_share`` (stacked area), ``cosine``
    (mean cosine heatmap), ``learning_gain`` (gain vs mean ‖g‖², and ‖g‖² beside the gain per
    window of steps), ``paper_gain`` (the paper's central plot for the baseline run: per-task
    ‖g‖² over training beside the windowed reward gain ``Gain(t)`` with window ``gain_window``
    steps, default :func:`default_gain_window`), ``accuracy`` (final held-out accuracy per task
    and run, when evaluated; with ``seed_runs`` — every seed's run, grouped by ``run.json`` name —
    bars are means over seeds and dots the seeds).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = _task_colors(runs)
    paths: dict[str, Path] = {}
    n = len(runs)

    fig, axes = _figure(n)
    for ax, run in zip(axes, runs):
        w = max(1, len(run.steps) // 15)
        for t in run.tasks:
            g = run.series(f"grad_norm/{t}")
            ax.plot(run.steps, np.where(g > 0, g, np.nan), color=colors[t], lw=0.6, alpha=0.3)
            ax.plot(run.steps, np.sqrt(rolling_mean(g**2, w)), color=colors[t], lw=1.6, label=t)
            u = run.series(f"grad_sqnorm_unbiased/{t}")
            if np.isfinite(u).any():
                um = rolling_mean(u, w)
                ax.plot(run.steps, np.sqrt(np.where(um > 0, um, np.nan)), color=colors[t], lw=1.2, ls="--")
        _log_scale(ax)
        ax.set_title(f"{run.name}: per-task |g| (rolling {w} steps; dashed: noise-corrected)", fontsize=8)
        ax.set_xlabel("optimizer step")
        _legend(ax, fontsize=7)
    paths["grad_norms"] = _save(fig, out / "grad_norms.png")

    fig, axes = _figure(1, width=5.5)
    ax = axes[0]
    for i, run in enumerate(runs):
        c = _COLORS[i % len(_COLORS)]
        ax.plot(run.steps, norm_ratio_series(run), color=c, lw=1.4, label=f"{run.name} raw")
        u = norm_ratio_series(run, unbiased=True)
        if np.isfinite(u).any():
            ax.plot(run.steps, u, color=c, lw=1.0, ls="--", label=f"{run.name} noise-corrected")
    _log_scale(ax)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title("max/min per-task gradient norm ratio", fontsize=9)
    ax.set_xlabel("optimizer step")
    _legend(ax, fontsize=7)
    paths["norm_ratio"] = _save(fig, out / "norm_ratio.png")

    fig, axes = _figure(n)
    for ax, run in zip(axes, runs):
        shares = [np.nan_to_num(run.series(f"update_share/{t}")) for t in run.tasks]
        if run.tasks and any(run.has(f"update_share/{t}") for t in run.tasks):
            ax.stackplot(run.steps, *shares, labels=list(run.tasks), colors=[colors[t] for t in run.tasks], alpha=0.85)
        ax.set_ylim(min(0.0, float(np.min(np.sum(np.minimum(shares, 0), axis=0))) if shares else 0.0), None)
        ax.set_title(f"{run.name}: share of the update", fontsize=9)
        ax.set_xlabel("optimizer step")
        _legend(ax, fontsize=7, loc="upper right")
    paths["update_share"] = _save(fig, out / "update_share.png")

    fig, axes = _figure(n, width=3.8, height=3.4)
    for ax, run in zip(axes, runs):
        mat = cosine_matrix(run)
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        k = len(run.tasks)
        ax.set_xticks(range(k), run.tasks, rotation=45, fontsize=7)
        ax.set_yticks(range(k), run.tasks, fontsize=7)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, _fmt(float(mat[i, j]), 2), ha="center", va="center", fontsize=7)
        ax.set_title(f"{run.name}: mean cosine", fontsize=9)
        ax.figure.colorbar(im, ax=ax, fraction=0.046)
    paths["cosine"] = _save(fig, out / "cosine.png")

    fig, axes = _figure(3, width=4.0)
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, run in enumerate(runs):
        sq = _mean_sqnorms(run, unbiased=False)
        ev = eval_learning_gain(run)
        rg = reward_learning_gain(run)
        for t in run.tasks:
            m = markers[i % len(markers)]
            axes[0].scatter(sq[t], ev[t], color=colors[t], marker=m, s=40, label=f"{run.name}/{t}")
            axes[1].scatter(sq[t], rg[t], color=colors[t], marker=m, s=40)
    for ax, title in zip(axes[:2], ["held-out accuracy gain", "training-reward gain (last - first quarter)"]):
        _log_scale(ax, "x")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("mean squared gradient norm |g|^2")
        ax.set_title(title, fontsize=9)
    _legend(axes[0], fontsize=6, ncol=2)
    base = runs[0]
    win = windowed_learning_gain(base)
    ax2 = axes[2].twinx()
    for t in base.tasks:
        axes[2].plot(win[t]["step"], win[t]["sqnorm"], color=colors[t], marker="o", lw=1.4, label=f"{t} |g|^2")
        ax2.plot(win[t]["step"], win[t]["gain"], color=colors[t], marker="x", lw=1.0, ls="--")
    _log_scale(axes[2])
    axes[2].set_xlabel("optimizer step (window centre)")
    axes[2].set_title(f"{base.name}: |g|^2 (solid) vs reward gain per window (dashed)", fontsize=8)
    ax2.axhline(0.0, color="grey", lw=0.6)
    _legend(axes[2], fontsize=6)
    paths["learning_gain"] = _save(fig, out / "learning_gain.png")

    base = _baseline(runs)
    s_win = gain_window or default_gain_window(base)
    gains = paper_gain_series(base, s_win)
    fig, axes = _figure(2, width=4.6)
    w = max(1, len(base.steps) // 15)
    for t in base.tasks:
        g2 = rolling_mean(base.series(f"grad_norm/{t}") ** 2, w)
        axes[0].plot(base.steps, np.where(g2 > 0, g2, np.nan), color=colors[t], lw=1.5, label=f"{t} raw")  # log axis
        u = base.series(f"grad_sqnorm_unbiased/{t}")
        if np.isfinite(u).any():
            um = rolling_mean(u, w)
            axes[0].plot(base.steps, np.where(um > 0, um, np.nan), color=colors[t], lw=1.1, ls="--")
        axes[1].plot(base.steps, gains[t], color=colors[t], lw=1.5, label=t)
    _log_scale(axes[0])
    axes[0].set_title(f"{base.name}: per-task |g|^2 (rolling {w}; dashed: noise-corrected)", fontsize=8)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set_title(f"{base.name}: training-reward gain Gain(t), window s={s_win}", fontsize=8)
    for ax in axes:
        ax.set_xlabel("optimizer step")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    paths["paper_gain"] = _save(fig, out / "paper_gain.png")

    if any(r.evals for r in runs):
        tasks = list(colors)
        fig, axes = _figure(1, width=max(5.0, 1.4 * len(tasks) * max(1, n) / 2))
        ax = axes[0]
        width = 0.8 / max(1, n + 1)
        x = np.arange(len(tasks) + 1)
        before = eval_accuracy(runs[0], "before")
        vals = [before.get(t, np.nan) for t in tasks]
        ax.bar(x[:-1] - 0.4 + width / 2, vals, width, color="lightgrey", label="before RL")
        for i, run in enumerate(runs):
            # every seed of this run's name: bars at the mean over seeds, one dot per seed
            per_seed = []
            for other in seed_runs or [run]:
                if _run_key(other) == _run_key(run):
                    acc = eval_accuracy(other, "after")
                    row = [acc.get(t, np.nan) for t in tasks]
                    fin = [v for v in row if math.isfinite(v)]
                    per_seed.append(row + [float(np.mean(fin)) if fin else np.nan])
            grid = np.array(per_seed, dtype=np.float64)
            with np.errstate(invalid="ignore"):
                vals = np.nanmean(grid, axis=0) if np.isfinite(grid).any() else grid[0]
            xs = x - 0.4 + width * (i + 1.5)
            color = _COLORS[i % len(_COLORS)]
            label = _run_key(run) + (f" (mean of {len(grid)} seeds)" if len(grid) > 1 else "")
            ax.bar(xs, vals, width, color=color, label=label)
            if len(grid) > 1:
                for row in grid:
                    ax.scatter(xs, row, s=9, color="black", zorder=3, linewidths=0)
        ax.set_xticks(x, tasks + ["mean"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out exact-match accuracy")
        ax.set_title("final held-out accuracy per task" + (" (dots: seeds)" if seed_runs and len(seed_runs) > len(runs) else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        paths["accuracy"] = _save(fig, out / "accuracy.png")
    return paths


# ---------------------------------------------------------------------------------------- report
def _baseline(runs: Sequence[Run]) -> Run:
    for run in runs:
        if run.method == "sum":
            return run
    return runs[0]


def _findings(runs: Sequence[Run], strong: float, seeds: int = 1) -> list[str]:
    """Plain statements about what the data show, including disagreements with the paper."""
    base = _baseline(runs)
    lines: list[str] = []
    zero = zero_gradient_tasks(base)
    if zero:
        lines.append(
            f"**No gradient at all.** In `{base.name}`, task(s) {', '.join(f'`{t}`' for t in zero)} had a zero gradient at every "
            "step: every completion of each of their groups got the same reward, so GRPO's advantages were 0. They are "
            "left out of the ratios below; a sparse-reward task the model cannot solve yet gets no signal at all."
        )
    ratio, hi, lo = sqnorm_ratio(base)
    if math.isfinite(ratio):
        lines.append(
            f"**Imbalance.** In `{base.name}`, task `{hi}` has the largest mean squared gradient norm, "
            f"{ratio:.1f}× that of `{lo}` (the paper reports up to ~33× between math tasks). "
            + (
                "The tasks' gradients are of similar size here (ratio < 2): no strong imbalance in this run."
                if ratio < 2
                else "The summed update is dominated by the large-gradient tasks."
            )
        )
    u_ratio, u_hi, u_lo = sqnorm_ratio(base, unbiased=True)
    if any(base.has(f"grad_sqnorm_unbiased/{t}") for t in base.tasks):
        if math.isfinite(u_ratio):
            if u_ratio < ratio / 2:
                verdict = "most of the raw imbalance is sampling noise, not signal"
            elif u_ratio > 2 * ratio:
                verdict = (
                    "the imbalance is *larger* once noise is removed — the small-gradient tasks' raw norms are mostly "
                    "sampling noise, their true mean gradients are smaller still"
                )
            else:
                verdict = "the imbalance survives the noise correction"
            lines.append(
                f"**Noise correction.** With the split-half unbiased estimate the ratio is {u_ratio:.1f}× "
                f"(`{u_hi}` vs `{u_lo}`): {verdict}."
            )
        else:
            lines.append(
                f"**Noise correction.** The unbiased squared-norm estimate of `{u_lo}` averages ≤ 0: its mini-batch "
                "gradient is indistinguishable from noise at this batch size, so its raw norm is mostly noise."
            )
    noise = [r for r in signal_noise_table(base) if math.isfinite(r["noise share of raw ‖g‖²"])]
    if noise:
        shares = ", ".join(
            f"`{r['task']}` {100 * max(0.0, min(1.0, r['noise share of raw ‖g‖²'])):.0f} %"
            + ("" if r["signal resolved"] else " (signal not resolved)")
            for r in noise
        )
        unresolved = [r["task"] for r in noise if not r["signal resolved"]]
        lines.append(
            f"**Signal vs noise.** Share of each task's raw squared gradient norm that is sampling noise at this batch "
            f"size: {shares}. "
            + (
                "Ratios between tasks involving "
                + ", ".join(f"`{t}`" for t in unresolved)
                + " measure noise, not signal: their noise-corrected norm is within two standard errors of 0."
                if unresolved
                else "Every task's noise-corrected norm is resolved (more than two standard errors above 0), so the "
                "noise-corrected ratios above measure signal."
            )
        )
    sq = _mean_sqnorms(base, unbiased=False)
    ev = eval_learning_gain(base)
    rg = reward_learning_gain(base)
    gain, gain_name = (ev, "held-out accuracy gain") if any(math.isfinite(v) for v in ev.values()) else (rg, "training-reward gain")
    fin = [t for t in base.tasks if math.isfinite(sq[t]) and math.isfinite(gain[t])]
    if len(fin) >= 2:
        top = max(fin, key=sq.__getitem__)
        best = max(fin, key=gain.__getitem__)
        rank = sorted(fin, key=lambda t: -gain[t]).index(top) + 1
        rho = spearman([sq[t] for t in fin], [gain[t] for t in fin]) if len(fin) >= 3 else float("nan")
        gains = ", ".join(f"`{t}` {gain[t]:+.3f}" for t in fin)
        n_eval = base.meta.get("eval_rows_per_task")
        se = 0.5 / math.sqrt(n_eval) if gain is ev and isinstance(n_eval, (int, float)) and n_eval > 0 else 0.0
        runner_up = max(gain[t] for t in fin if t != top)
        if se and all(abs(gain[t]) < se for t in fin):
            verdict = (
                f"no task's held-out accuracy moved by more than the eval's standard error (~{se:.3f}) — too small to "
                "confirm or refute the paper here (more steps or prompts would tell)"
            )
        elif top == best and gain[top] > runner_up and gain[top] - runner_up < se:
            verdict = (
                f"the largest-gradient task `{top}` has the largest gain, but by less than the eval's standard error "
                f"(~{se:.3f}): no evidence either way"
            )
        elif top == best and gain[top] > runner_up:
            verdict = (
                "here the largest-gradient task also learned the most — this run **disagrees with the paper** "
                "(larger gradients did buy larger gains)"
            )
        else:
            verdict = (
                f"the largest-gradient task `{top}` ranks {rank} of {len(fin)} by gain — consistent with the paper "
                "(larger gradients do not buy larger learning gains)"
            )
        lines.append(
            f"**Gradient size vs learning gain.** {gain_name.capitalize()} per task: {gains}; Spearman correlation across "
            f"tasks of mean ‖g‖² with gain: {_fmt(rho, 2)} (only {len(fin)} points: weak evidence). {verdict[0].upper()}{verdict[1:]}."
        )
    corr = [r for r in correlations(base) if r["scope"] == "pooled"]
    if corr:
        best_c = max(corr, key=lambda r: abs(r["spearman"]) if math.isfinite(r["spearman"]) else -1)
        desc = ", ".join(f"{r['statistic']} ρ={_fmt(r['spearman'], 2)}" for r in corr)
        if math.isfinite(best_c["spearman"]) and abs(best_c["spearman"]) >= strong:
            verdict = (
                f"`{best_c['statistic']}` tracks the gradient norm strongly (|ρ| ≥ {strong}) — here the imbalance "
                "**is** largely explained by a training statistic, which disagrees with the paper"
            )
        else:
            verdict = (
                f"no statistic reaches |ρ| ≥ {strong}: as in the paper, the training statistics do not explain the "
                "gradient imbalance"
            )
        lines.append(f"**Explained by training statistics?** Pooled over tasks and steps: {desc}. {verdict[0].upper()}{verdict[1:]}.")
    if len(runs) > 1:
        table = {r["run"]: r for r in comparison_table(runs)}
        b = table[base.name]
        for run in runs:
            if run is base:
                continue
            r = table[run.name]
            parts = []
            if math.isfinite(r["mean acc"]) and math.isfinite(b["mean acc"]):
                d_mean = r["mean acc"] - b["mean acc"]
                d_worst = r["worst acc"] - b["worst acc"]
                parts.append(
                    f"Mean held-out accuracy {r['mean acc']:.3f} ({d_mean:+.3f}), worst task `{r['worst task']}` "
                    f"{r['worst acc']:.3f} ({d_worst:+.3f})"
                )
            parts.append(f"{'update' if parts else 'Update'}-share ratio {_fmt(r['share ratio'], 2)} vs {_fmt(b['share ratio'], 2)}")
            parts.append(f"{_fmt(r['s/step'], 3)} s/step vs {_fmt(b['s/step'], 3)}")
            lines.append(f"**`{run.name}` vs `{base.name}`.** " + "; ".join(parts) + ".")
    n_eval = base.meta.get("eval_rows_per_task")
    caveat = (
        f"**Caveats.** {len(base.steps)} optimizer steps"
        + (
            f", {seeds} seeds: the figures in this section are the first seed's; the Decision section uses every seed"
            if seeds > 1
            else ", one seed"
        )
        + (f", {n_eval} held-out prompts per task (a 0.5 accuracy has a standard error of {0.5 / math.sqrt(n_eval):.3f})" if n_eval else "")
        + ". Differences smaller than that are noise."
    )
    lines.append(caveat)
    return lines


def _run_key(run: Run) -> str:
    """The name a run is grouped by across seeds: ``run.json``'s ``name``, else the run's label."""
    return str(run.meta.get("name", run.name))


def _one_seed_per_name(runs: Sequence[Run]) -> list[Run]:
    """The first run of each name (the per-run sections show one seed; the Decision uses all)."""
    seen: dict[str, Run] = {}
    for run in runs:
        seen.setdefault(_run_key(run), run)
    return list(seen.values())


def _decision(runs: Sequence[Run], baseline: str) -> tuple[list[str], list[dict[str, str]]]:
    """Verdict sentences and table rows of every run name against ``baseline``, paired over seeds and prompts.

    Empty when fewer than two names have per-prompt scores (``eval_scores.json``); a comparison that
    cannot be made (different prompts, no shared seed) becomes a sentence saying why.
    """
    from .comparison import compare_groups, comparison_rows, verdict_sentences

    scores = [r.scores for r in runs if r.scores is not None]
    if len({s.name for s in scores}) < 2 or baseline not in {s.name for s in scores}:
        return [], []
    try:
        comparisons = compare_groups(scores, baseline=baseline)
    except ValueError as err:
        return [f"No paired comparison: {err}."], []
    return verdict_sentences(comparisons, baseline), comparison_rows(comparisons)


def write_report(
    runs: Sequence[Run],
    out: str | os.PathLike[str],
    title: str = "balancedmix report",
    strong: float = 0.7,
    gain_window: int | None = None,
) -> Path:
    """Write ``out/report.md`` with every table and plot; returns its path.

    Several runs of one name (``run.json`` ``name``, one per seed) are one method: the per-run
    sections show its first run, and the Decision section at the top compares every name with the
    baseline paired over all seeds and prompts (runs with ``eval_scores.json``,
    :mod:`balancedmix.comparison`).

    Sections: Decision, Findings, Runs compared, Per-task gradients, Gradient norm over steps, Update
    share, Task-gradient cosines, Learning gain vs gradient norm, Correlation with training
    statistics. ``strong`` is the |Spearman| above which a statistic counts as explaining the
    gradient norm. ``gain_window``: the window ``s`` (steps) of the paper's ``Gain(t)`` (default
    :func:`default_gain_window`). Each run's :attr:`Run.problems` (torn lines, unfinished run...) are listed
    under "Log problems" at the top.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out = Path(out)
    all_runs = list(runs)
    runs = _one_seed_per_name(all_runs)
    base_key = _run_key(_baseline(runs))
    seeds = len({r.meta.get("seed") for r in all_runs if _run_key(r) == base_key})
    verdicts, decision_rows = _decision(all_runs, base_key)
    plots = write_plots(runs, out, gain_window=gain_window, seed_runs=all_runs)

    def img(name: str, alt: str) -> str:
        return f"![{alt}]({plots[name].name})\n" if name in plots else ""

    parts = [f"# {title}\n\n"]
    if verdicts:
        parts.append("## Decision\n\n")
        parts.extend(f"- {line}\n" for line in verdicts)
        parts.append(
            "\nDifferences of final held-out exact-match accuracy to the baseline, paired by seed and prompt, with "
            "confidence intervals over both (seeds × prompts random effects, `docs/significance.md`); a verdict only where "
            "the interval excludes 0.\n\n"
        )
        if decision_rows:
            parts.append(markdown_table(decision_rows))
        parts.append("\n")
    parts.append("Runs: " + ", ".join(f"`{r.name}` ({r.method}, {len(r.steps)} steps, `{r.path}`)" for r in all_runs) + "\n")
    flagged = [(r, p) for r in all_runs for p in r.problems]
    if flagged:
        parts.append("\n**Log problems** (the figures below use what could be read):\n\n")
        parts.extend(f"- `{r.name}`: {p}\n" for r, p in flagged)
    parts.append("\n## Findings\n\n")
    parts.extend(f"- {line}\n" for line in _findings(runs, strong, seeds))
    parts.append("\n## Runs compared\n\n")
    parts.append(
        "Final held-out exact-match accuracy per task (`acc/<task>`), its mean and the worst task; `‖g‖² ratio`: "
        "max/min over tasks of the mean squared gradient norm (raw and noise-corrected); `share ratio`: max/min mean "
        "share of the applied update; `s/step`: wall seconds per optimizer step.\n\n"
    )
    parts.append(markdown_table(comparison_table(runs)))
    parts.append("\n" + img("accuracy", "final held-out accuracy"))
    parts.append("\n## Per-task gradients\n")
    for run in runs:
        parts.append(f"\n**{run.name}**\n\n")
        parts.append(markdown_table(task_gradient_table(run)))
        ev = eval_learning_gain(run)
        rg = reward_learning_gain(run)
        before, after = eval_accuracy(run, "before"), eval_accuracy(run, "after")
        parts.append("\n")
        parts.append(
            markdown_table(
                [
                    {
                        "task": t,
                        "acc before": before[t],
                        "acc after": after[t],
                        "eval gain": ev[t],
                        "reward gain": rg[t],
                    }
                    for t in run.tasks
                ]
            )
        )
    base = _baseline(runs)
    parts.append("\n## Signal and noise per task\n\n")
    parts.append(
        f"`{base.name}`. The raw squared norm of a mini-batch gradient is the true squared norm plus tr Σ / n (sampling "
        "noise); the split-half estimator separates them. `noise scale`: tr Σ / ‖g‖², the batch size (in samples) "
        "at which noise equals signal.\n\n"
    )
    parts.append(markdown_table(signal_noise_table(base)))
    parts.append("\n## The paper's central plot: gradient size vs learning gain over training\n\n")
    parts.append(
        "Left: per-task squared gradient norm over training; right: the windowed training-reward gain "
        "Gain(t) = mean reward over the next s steps − mean over the previous s steps (the paper's definition; "
        "s is ours, the paper does not report it).\n\n"
    )
    parts.append(img("paper_gain", "squared gradient norm beside learning gain"))
    parts.append("\n## Gradient norm over steps\n\n")
    parts.append(
        "Faint: raw per-task norm ‖g_t‖ at each step; solid: root of its rolling mean square; dashed: root of the "
        "rolling mean of the noise-corrected (split-half unbiased) estimate of ‖g_t‖².\n\n"
    )
    parts.append(img("grad_norms", "per-task gradient norms"))
    parts.append("\n" + img("norm_ratio", "max/min norm ratio"))
    parts.append("\n## Update share\n\n")
    parts.append("Each task's share ⟨c_t G_t, G⟩/‖G‖² of the applied update (sums to 1; negative = pulls against it).\n\n")
    parts.append(img("update_share", "update share"))
    parts.append("\n## Task-gradient cosines\n\n")
    parts.append("Cosine between task gradients, averaged over steps (negative = conflicting tasks).\n\n")
    parts.append(img("cosine", "cosine heatmap"))
    parts.append("\n## Learning gain vs gradient norm\n\n")
    parts.append(
        "The paper's central figure: does a larger gradient buy a larger learning gain? Left: held-out accuracy gain "
        "(after − before RL); middle: training-reward gain (mean reward of the last quarter of steps − the first); "
        "right: per window of steps, mean ‖g‖² and the reward gain over the previous window.\n\n"
    )
    parts.append(img("learning_gain", "learning gain vs gradient norm"))
    parts.append("\n## Correlation with training statistics\n\n")
    parts.append(
        "Pearson and Spearman correlation of the per-task gradient norm with training statistics, per task (over "
        "steps) and pooled (all tasks' steps together — the scope that could explain differences *between* tasks).\n"
    )
    for run in runs:
        rows = correlations(run)
        parts.append(f"\n**{run.name}**\n\n")
        parts.append(markdown_table(rows, digits=2) if rows else "_(no reward/advantage/length statistics logged)_\n")
    path = out / "report.md"
    path.write_text("".join(parts), encoding="utf-8")
    logger.info("wrote %s", path)
    return path
