"""Shared pieces of the benchmark suites: machine description, models, data, timing, tables.

Every suite returns a plain ``dict`` (JSON-serialisable) with ``rows`` (one dict per measured
configuration), ``targets`` (each ``{"name", "value", "limit", "met"}``), ``notes`` and
``skipped`` (rows that could not run, with the reason). :func:`render_suite` turns it into a
markdown section.

Timing protocol: each configuration is a :class:`Runner` whose ``step()`` performs one whole
training step (forward + backward over every micro-batch + optimizer step). Configurations that
are compared with each other are timed *interleaved* (round-robin: one step of each, repeated),
after one untimed warm-up step each, so that load drifting on a shared machine hits all of them
alike; the figure reported is the median over the repeats. On a GPU the runners are built and
timed one after another instead (they would not all fit in memory), with
``torch.cuda.synchronize()`` around every timed step.

Ratios that a target is stated on are measured with :func:`time_paired` (CPU): the
configurations alternate step by step on the same batches (the order reversed every round), each
round gives one ratio per configuration against its baseline, and the reported ratio is the
median of those per-round ratios with a distribution-free confidence interval for the median
(:func:`median_ci`, order statistics of Binomial(n, 1/2)). Rounds continue until every interval's
half-width is at most ``precision`` (1 % of the ratio by default) or the time budget is spent
(:class:`PairedTimer`); a target is then **met** (the whole interval on the right side of the
limit), **missed** (the whole interval on the wrong side) or **undecided** (:func:`verdict`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelSpec",
    "TINY_LLAMA",
    "QWEN_05B",
    "QUICK_LLAMA",
    "Workload",
    "machine_info",
    "build_model",
    "make_microbatches",
    "token_ce",
    "microbatch_loss",
    "Runner",
    "time_runners",
    "MedianCI",
    "median_ci",
    "verdict",
    "PairedTimer",
    "time_paired",
    "ratio_target",
    "synchronize",
    "target",
    "render_suite",
    "fmt_ratio",
    "fmt_time",
    "fmt_bytes",
]


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version, threads, GPU (if any), load average at start."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A random-initialised decoder config (no download: built from the config in code)."""

    name: str
    arch: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool = True

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        head_dim = h // self.num_heads
        kv = self.num_kv_heads * head_dim
        attn = h * h * 2 + h * kv * 2 + (2 * kv + h if self.arch == "qwen2" else 0)
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_embeddings else 2) + self.num_layers * layer + h


#: ~10 M parameters: the CPU model of the overhead and anchor suites.
TINY_LLAMA = ModelSpec("tiny-llama-10M", "llama", 8192, 256, 1024, 8, 8, 4)
#: a toy model for ``--quick`` runs and the smoke test (~0.2 M parameters).
QUICK_LLAMA = ModelSpec("quick-llama-0.2M", "llama", 512, 64, 128, 2, 4, 2)
#: the shape of Qwen2.5-0.5B (random init, bf16): the GPU model.
QWEN_05B = ModelSpec("qwen2.5-0.5B-shape", "qwen2", 151936, 896, 4864, 24, 14, 2)


def build_model(spec: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The decoder of ``spec`` with weights from ``seed`` (same seed → identical weights), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if spec.arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = cfg_cls(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=spec.tie_embeddings,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(device=device, dtype=dtype)
    model.eval()  # no dropout: the same batch gives the same gradient in every implementation
    return model


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Workload:
    """One training step's data: ``num_microbatches`` micro-batches of ``batch × seq`` tokens.

    Micro-batch ``m`` belongs to task ``m mod K`` (task-homogeneous micro-batches, the way
    balancedmix's sampler builds them). Sequences have no padding so that every implementation
    (per micro-batch or per mixed chunk) averages over the same tokens.
    """

    num_microbatches: int = 8
    batch: int = 2
    seq: int = 64

    @property
    def tokens_per_step(self) -> int:
        return self.num_microbatches * self.batch * self.seq


def make_microbatches(workload: Workload, vocab_size: int, device: str = "cpu", seed: int = 1234) -> list[torch.Tensor]:
    """``num_microbatches`` random token tensors ``[batch, seq]`` (int64), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab_size, (workload.batch, workload.seq), generator=gen).to(device)
        for _ in range(workload.num_microbatches)
    ]


def task_names(k: int) -> list[str]:
    return [f"task{t}" for t in range(k)]


def token_ce(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy ``[B, S-1]`` (float32) of ``model`` on ``ids``."""
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], ids.shape[1] - 1)


def microbatch_loss(model: torch.nn.Module, ids: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """Mean token loss of one micro-batch divided by the number of micro-batches (accumulation)."""
    return token_ce(model, ids).mean() / num_microbatches


# ----------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Runner:
    """One configuration under test: ``step()`` runs one complete training step.

    ``info`` carries what the table shows besides time (method, K, extra bytes, ...);
    ``close()`` frees what the runner holds (hooks, models).
    """

    name: str
    step: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def time_runners(
    factories: Sequence[Callable[[], Runner]],
    repeats: int,
    device: str = "cpu",
    interleave: bool = True,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """Time each runner's ``step()``; returns one row per runner with ``times_s`` and ``median_s``.

    ``interleave=True`` builds all runners first and times them round-robin (CPU, shared
    machine); ``False`` builds, times and frees them one at a time (GPU memory). On CUDA each
    runner's peak allocated memory over its timed steps is recorded as ``peak_bytes``.
    """
    cuda = str(device).startswith("cuda")
    rows: list[dict[str, Any]] = []

    def timed(r: Runner) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        r.step()
        synchronize(device)
        return time.perf_counter() - t0

    if interleave:
        runners = [f() for f in factories]
        times: list[list[float]] = [[] for _ in runners]
        for r in runners:
            for _ in range(warmup):
                r.step()
        for _ in range(repeats):
            for i, r in enumerate(runners):
                times[i].append(timed(r))
        for r, ts in zip(runners, times):
            rows.append(_row(r, ts))
            r.close()
        del runners
    else:
        for f in factories:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            r = f()
            for _ in range(warmup):
                r.step()
            ts = [timed(r) for _ in range(repeats)]
            row = _row(r, ts)
            if cuda:
                row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
            rows.append(row)
            r.close()
            del r
            gc.collect()
    gc.collect()
    return rows


def _row(r: Runner, ts: list[float]) -> dict[str, Any]:
    return {"name": r.name, **r.info, "times_s": [round(t, 6) for t in ts], "median_s": statistics.median(ts)}


def median_time(fn: Callable[[], Any], repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- paired ratios with intervals
@dataclass(frozen=True)
class MedianCI:
    """The sample median of ``n`` values and a confidence interval ``[lo, hi]`` for the median.

    ``coverage`` is the interval's exact coverage for any continuous distribution
    (``1 − 2·P(B ≤ j − 1)``, ``B ~ Binomial(n, 1/2)``), at least the confidence asked for.
    ``lo``/``hi`` are ``None`` when ``n`` is too small for that confidence (fewer than 6 values
    at 95 %: even the sample's extremes cover the median with probability ``1 − 2^(1−n)`` only).
    """

    median: float
    lo: float | None
    hi: float | None
    n: int
    coverage: float | None

    @property
    def half_width(self) -> float:
        """``(hi − lo) / 2`` (``inf`` without an interval)."""
        if self.lo is None or self.hi is None:
            return math.inf
        return (self.hi - self.lo) / 2

    @property
    def rel_half_width(self) -> float:
        """``half_width / |median|`` (``inf`` without an interval or for a zero median)."""
        hw = self.half_width
        return math.inf if math.isinf(hw) or self.median == 0 else hw / abs(self.median)


def _binom_cdf_half(k: int, n: int) -> float:
    """``P(B ≤ k)`` for ``B ~ Binomial(n, 1/2)``, exactly (integers, then one division)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def median_ci(values: Sequence[float], confidence: float = 0.95) -> MedianCI:
    """Median of ``values`` and its distribution-free confidence interval (order statistics).

    With ``x_(1) ≤ … ≤ x_(n)`` sorted, ``P(x_(j) ≤ m < x_(n−j+1)) = 1 − 2·P(B ≤ j − 1)`` for the
    true median ``m`` of any continuous distribution, ``B ~ Binomial(n, 1/2)`` (the number of
    values below ``m``). The largest ``j`` with ``P(B ≤ j − 1) ≤ (1 − confidence)/2`` gives the
    shortest such interval with at least the asked coverage. Needs only independent draws
    from one distribution: no normality, robust to the outliers a shared machine produces.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    if any(math.isnan(v) for v in xs):
        raise ValueError("median_ci: a value is NaN")
    med = statistics.median(xs)
    alpha_half = (1.0 - confidence) / 2
    j = 0  # 1-based rank of the lower bound; 0 = no interval reaches the confidence
    while j + 1 <= n // 2 and _binom_cdf_half(j, n) <= alpha_half:
        j += 1
    if j == 0:
        return MedianCI(med, None, None, n, None)
    coverage = 1.0 - 2.0 * _binom_cdf_half(j - 1, n)
    return MedianCI(med, xs[j - 1], xs[n - j], n, coverage)


def verdict(ci: MedianCI | None, limit: float, kind: str = "<=") -> str:
    """``"met"`` / ``"missed"`` / ``"undecided"`` for the target ``median kind limit``.

    Met: the whole interval satisfies the target; missed: the whole interval violates it;
    undecided: the interval straddles the limit, or there is no interval (too few pairs).
    """
    if kind not in ("<=", ">="):
        raise ValueError(f"kind must be '<=' or '>=', got {kind!r}")
    if ci is None or ci.lo is None or ci.hi is None:
        return "undecided"
    if kind == "<=":
        return "met" if ci.hi <= limit else ("missed" if ci.lo > limit else "undecided")
    return "met" if ci.lo >= limit else ("missed" if ci.hi < limit else "undecided")


class PairedTimer:
    """Bookkeeping of paired, interleaved timing rounds and the stopping rule (no clock inside).

    ``baselines[i]`` is the index of configuration ``i``'s baseline, or ``None`` for a baseline.
    Each :meth:`add_round` takes one time per configuration measured in the same round; the
    per-round ratio ``t_i / t_baseline(i)`` is one pair. :meth:`stop_reason` says when to stop:
    ``"precision"`` once every ratio's interval has a relative half-width ``≤ precision`` (after
    at least ``min_pairs`` rounds), ``"budget"`` once ``elapsed_s ≥ budget_s``, ``"max_pairs"``
    at ``max_pairs`` rounds; ``None`` to go on. Nothing stops before ``min_pairs`` rounds.
    """

    def __init__(
        self,
        baselines: Sequence[int | None],
        precision: float = 0.01,
        budget_s: float = 60.0,
        confidence: float = 0.95,
        min_pairs: int = 6,
        max_pairs: int = 400,
    ) -> None:
        n = len(baselines)
        for i, b in enumerate(baselines):
            if b is not None and not (0 <= b < n and baselines[b] is None):
                raise ValueError(f"configuration {i}: baseline {b!r} is not a baseline configuration index")
        if precision <= 0 or budget_s < 0 or min_pairs < 1 or max_pairs < min_pairs:
            raise ValueError(f"bad stopping rule: precision={precision}, budget_s={budget_s}, min_pairs={min_pairs}, max_pairs={max_pairs}")
        self.baselines = list(baselines)
        self.precision = precision
        self.budget_s = budget_s
        self.confidence = confidence
        self.min_pairs = min_pairs
        self.max_pairs = max_pairs
        self.times: list[list[float]] = [[] for _ in baselines]

    @property
    def rounds(self) -> int:
        return len(self.times[0]) if self.times else 0

    def add_round(self, times: Sequence[float]) -> None:
        if len(times) != len(self.times):
            raise ValueError(f"a round needs {len(self.times)} times, got {len(times)}")
        for ts, t in zip(self.times, times):
            ts.append(float(t))

    def ratios(self, i: int, j: int | None = None) -> list[float]:
        """Per-round ratios ``t_i / t_j`` (``j`` defaults to ``i``'s baseline)."""
        j = self.baselines[i] if j is None else j
        if j is None:
            return [1.0] * self.rounds
        return [a / b for a, b in zip(self.times[i], self.times[j])]

    def ratio_ci(self, i: int, j: int | None = None) -> MedianCI:
        return median_ci(self.ratios(i, j), self.confidence)

    def stop_reason(self, elapsed_s: float) -> str | None:
        if self.rounds < self.min_pairs:  # the budget never cuts the minimum short
            return None
        cis = [self.ratio_ci(i) for i, b in enumerate(self.baselines) if b is not None]
        if all(ci.rel_half_width <= self.precision for ci in cis):
            return "precision"
        if elapsed_s >= self.budget_s:
            return "budget"
        if self.rounds >= self.max_pairs:
            return "max_pairs"
        return None


def time_paired(
    factories: Sequence[Callable[[], Runner]],
    baselines: Sequence[int | None] | None = None,
    budget_s: float = 60.0,
    precision: float = 0.01,
    confidence: float = 0.95,
    min_pairs: int = 6,
    max_pairs: int = 400,
    device: str = "cpu",
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """Paired, interleaved timing: one step of every runner per round, until :class:`PairedTimer` stops.

    ``baselines`` defaults to "runner 0 is everyone's baseline". The order within a round is
    reversed every other round (so no configuration always runs right after another). Each row
    has ``times_s``, ``median_s``, ``pairs``, ``ratios``, ``ratio`` (median of the per-round
    ratios), ``ratio_lo``/``ratio_hi`` (its interval), ``ratio_coverage``, ``ratio_half_width``
    and ``stop`` (why the rounds ended: ``precision``, ``budget``, ``max_pairs``).
    """
    baselines = list(baselines) if baselines is not None else [None] + [0] * (len(factories) - 1)
    timer = PairedTimer(baselines, precision, budget_s, confidence, min_pairs, max_pairs)
    runners = [f() for f in factories]
    for r in runners:
        for _ in range(warmup):
            r.step()
    start = clock()
    order = list(range(len(runners)))
    reason = None
    while reason is None:
        times = [0.0] * len(runners)
        for i in order if timer.rounds % 2 == 0 else order[::-1]:
            synchronize(device)
            t0 = clock()
            runners[i].step()
            synchronize(device)
            times[i] = clock() - t0
        timer.add_round(times)
        reason = timer.stop_reason(clock() - start)
    rows = []
    for i, r in enumerate(runners):
        row = _row(r, timer.times[i])
        rows.append({**row, **paired_fields(timer, i), "stop": reason})
        r.close()
    del runners
    gc.collect()
    return rows


def paired_fields(timer: PairedTimer, i: int) -> dict[str, Any]:
    """The ratio columns of configuration ``i`` (for rows built outside :func:`time_paired`)."""
    if timer.baselines[i] is None:
        return {"pairs": timer.rounds, "ratios": [], "ratio": 1.0, "ratio_lo": None, "ratio_hi": None,
                "ratio_coverage": None, "ratio_half_width": None, "baseline": True}
    ci = timer.ratio_ci(i)
    return {
        "pairs": timer.rounds,
        "ratios": [round(x, 6) for x in timer.ratios(i)],
        "ratio": ci.median,
        "ratio_lo": ci.lo,
        "ratio_hi": ci.hi,
        "ratio_coverage": ci.coverage,
        "ratio_half_width": None if math.isinf(ci.half_width) else ci.half_width,
    }


def pair_ratio_row(num: dict[str, Any], den: dict[str, Any], confidence: float = 0.95) -> dict[str, Any] | None:
    """The paired ratio ``num / den`` of two rows timed in the same rounds of :func:`time_paired`
    (their ``times_s`` are aligned round by round), in the fields :func:`ratio_target` reads."""
    a, b = num.get("times_s"), den.get("times_s")
    if not a or not b or len(a) != len(b):
        return None
    ci = median_ci([x / y for x, y in zip(a, b)], confidence)
    return {"pairs": ci.n, "ratio": ci.median, "ratio_lo": ci.lo, "ratio_hi": ci.hi, "ratio_coverage": ci.coverage}


def fmt_ratio_ci(row: dict[str, Any]) -> str:
    """``1.012× [1.004, 1.020]`` from a row's ``ratio``/``ratio_lo``/``ratio_hi`` (no interval: ``[—]``)."""
    if row.get("ratio") is None:
        return "—"
    if row.get("baseline"):
        return "1 (baseline)"
    lo, hi = row.get("ratio_lo"), row.get("ratio_hi")
    return f"{row['ratio']:.3f}× " + ("[—]" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]")


def ratio_target(name: str, row: dict[str, Any] | None, limit: float, kind: str = "<=", confidence: float = 0.95) -> dict[str, Any]:
    """A target on a paired ratio: value = the median ratio, with its interval and verdict.

    ``met`` is True / False / None for met / missed / undecided (``not measured`` when ``row`` is None).
    """
    if row is None or row.get("ratio") is None:
        t = target(name, None, limit, kind)
        t["verdict"] = "not measured"
        return t
    ci = MedianCI(row["ratio"], row.get("ratio_lo"), row.get("ratio_hi"), int(row.get("pairs", 0)), row.get("ratio_coverage"))
    v = verdict(ci, limit, kind)
    return {"name": name, "value": row["ratio"], "lo": ci.lo, "hi": ci.hi, "pairs": ci.n, "limit": limit, "kind": kind,
            "confidence": confidence, "verdict": v, "met": {"met": True, "missed": False}.get(v)}


# ----------------------------------------------------------------------------- targets and tables
def target(name: str, value: float | None, limit: float, kind: str = "<=") -> dict[str, Any]:
    """A target line: ``value kind limit`` (``met`` is None when the value could not be measured)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        met = None
    else:
        met = value <= limit if kind == "<=" else value >= limit
    return {"name": name, "value": value, "limit": limit, "kind": kind, "met": met}


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}×"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` = [(header, key)]; a key's value is formatted by ``_cell`` unless already a str."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def render_targets(targets: Sequence[dict[str, Any]]) -> str:
    if not targets:
        return ""
    with_ci = any("verdict" in t for t in targets)

    def num(v: float | None) -> str:
        return "—" if v is None else (f"{v:.3g}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3f}")

    if with_ci:
        lines = ["| target | measured (median) | 95 % CI (pairs) | limit | verdict |", "|---|---|---|---|---|"]
    else:
        lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for t in targets:
        if "verdict" in t:
            met = t["verdict"] if t["verdict"] == "not measured" else f"**{t['verdict']}**"
        else:
            met = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        if with_ci:
            if "verdict" in t:
                lo, hi = t.get("lo"), t.get("hi")
                ci = f"[{num(lo)}, {num(hi)}] ({t.get('pairs', 0)})" if lo is not None and hi is not None else f"— ({t.get('pairs', 0)})"
            else:
                ci = "—"
            lines.append(f"| {t['name']} | {num(t['value'])} | {ci} | {t['kind']} {t['limit']} | {met} |")
        else:
            lines.append(f"| {t['name']} | {num(t['value'])} | {t['kind']} {t['limit']} | {met} |")
    return "\n".join(lines)


def render_suite(title: str, suite: dict[str, Any]) -> str:
    """Markdown section for one suite: tables, targets, skipped rows, notes."""
    parts = [f"### {title}", ""]
    for table in suite.get("tables", []):
        if table.get("caption"):
            parts += [table["caption"], ""]
        parts += [markdown_table(table["rows"], table["columns"]), ""]
    if suite.get("targets"):
        parts += ["Targets:", "", render_targets(suite["targets"]), ""]
    for s in suite.get("skipped", []):
        parts.append(f"- skipped: {s}")
    for n in suite.get("notes", []):
        parts.append(f"- {n}")
    return "\n".join(parts).rstrip() + "\n"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """All ``p.grad`` concatenated as one float64 vector (zeros for missing gradients)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double().cpu() for p in params]
    )


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / max(‖b‖, tiny)``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def suite_main(name: str, title: str, run: Callable[..., dict[str, Any]], doc: str | None, argv: list[str] | None = None) -> int:
    """Command line of one suite run directly: ``--quick``, ``--repeats N``, ``--out DIR``.

    Writes ``DIR/<name>.json`` (with the machine) and ``DIR/<name>.md``, prints the markdown.
    """
    import argparse

    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy model and sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 5, quick 2)")
    parser.add_argument("--out", default=f"benchmarks/results/{name}", help="output directory")
    args = parser.parse_args(argv)
    suite = run(quick=args.quick, repeats=args.repeats or (2 if args.quick else 5))
    out = Path(args.out)
    write_json(out / f"{name}.json", {"machine": machine_info(), name: suite})
    text = render_suite(title, suite)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0
