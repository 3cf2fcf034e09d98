"""Where balancedmix's overhead goes: ``torch.profiler`` of one plain step and one balancedmix step.

``python benchmarks/profile_step.py [--quick] [--method sum] [--estimator raw] [--k 4] [--capture direct]`` prints,
for the same micro-batches, the self CPU time per step and the top operators by self CPU time
of a plain step and of a balancedmix step. balancedmix's own work shows up as the extra
``aten::copy_`` / ``aten::add_`` calls (the gradient hooks filling the task buffers: one per
parameter per micro-batch) and the ``aten::mm`` / ``aten::mv`` of ``step()`` (Gram, clip-check
dots, combine).

``--breakdown N`` instead times N interleaved steps of plain, ``capture="hooks"`` and
``capture="direct"`` and prints the median wall time per step spent in balancedmix's pieces (the
hooks' copy/add, the direct mode's first-touch copies, the step's Gram passes), measured by
wrapping those functions: the figures of "Where the time goes at short micro-batches" in
``docs/benchmarks.md``.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import argparse
import statistics
import time
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

from .common import QUICK_LLAMA, TINY_LLAMA
from .overhead import FULL_WORKLOAD, QUICK_WORKLOAD
from .runners import balanced_runner, plain_runner

__all__ = ["profile_runner", "main"]


def profile_runner(runner: Any, steps: int = 2, row_limit: int = 12) -> tuple[float, str]:
    """Warm up once, profile ``steps`` steps; returns (total self CPU seconds per step, top-ops table)."""
    runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("train_step"):
                runner.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    return total, events.table(sort_by="self_cpu_time_total", row_limit=row_limit)


def breakdown(spec: Any, wl: Any, k: int, method: str, estimator: str, rounds: int) -> str:
    """Median wall time per step of each timed piece, for plain / hooks / direct (interleaved rounds)."""
    import balancedmix.buffers as buffers
    import balancedmix.direct as direct
    import balancedmix.optimizer as optimizer
    import balancedmix.storage as storage

    acc: dict[str, float] = {}
    pieces = [
        (optimizer.BalancedOptimizer, "_capture", "hooks: copy/add into the row (_capture)"),
        (buffers.FlatBuffers, "store", "direct: first-touch copy into the row (store)"),
        (direct.DirectCapture, "park", "direct: hook bookkeeping before accumulation (park)"),
        (direct.DirectCapture, "capture", "direct: hook bookkeeping after accumulation (capture)"),
        (storage.ExactStorage, "row_stats", "step: Gram + consistency dots (row_stats)"),
        (storage.ExactStorage, "gram_and_sum", "step: Gram + p.grad = Σ rows (gram_and_sum)"),
        (storage.ExactStorage, "combine", "step: correction (combine)"),
        (optimizer.BalancedOptimizer, "_prepare_step", "step: everything before the inner step"),
    ]
    saved = [(cls, name, getattr(cls, name)) for cls, name, _ in pieces]

    def timed(fn: Any, label: str) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    for cls, name, label in pieces:
        setattr(cls, name, timed(getattr(cls, name), label))
    try:
        runners = {
            "plain": plain_runner(spec, wl, k),
            "hooks": balanced_runner(spec, wl, k, method, estimator),
            "direct": balanced_runner(spec, wl, k, method, estimator, capture="direct"),
        }
        for r in runners.values():
            r.step()
        times: dict[str, list[float]] = {n: [] for n in runners}
        parts: dict[str, dict[str, list[float]]] = {n: {} for n in runners}
        for i in range(rounds):
            for name in list(runners) if i % 2 == 0 else list(runners)[::-1]:
                acc.clear()
                t0 = time.perf_counter()
                runners[name].step()
                times[name].append(time.perf_counter() - t0)
                for label, v in acc.items():
                    parts[name].setdefault(label, []).append(v)
        for r in runners.values():
            r.close()
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    lines = []
    for name in times:
        ratios = sorted(a / b for a, b in zip(times[name], times["plain"]))
        lines.append(f"{name}: {statistics.median(times[name]) * 1e3:.1f} ms/step, paired ratio to plain "
                     f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}, {rounds} rounds)")
        for label, v in parts[name].items():
            lines.append(f"    {label:58s} {statistics.median(v) * 1e3:7.2f} ms/step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--method", default="sum")
    parser.add_argument("--estimator", default="raw", choices=("raw", "split"))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--capture", default="hooks", choices=("hooks", "direct"))
    parser.add_argument("--breakdown", type=int, default=0, metavar="ROUNDS",
                        help="time the pieces of plain / hooks / direct over ROUNDS interleaved steps instead of profiling")
    args = parser.parse_args(argv)
    spec = QUICK_LLAMA if args.quick else TINY_LLAMA
    wl = QUICK_WORKLOAD if args.quick else FULL_WORKLOAD
    if args.breakdown:
        print(breakdown(spec, wl, args.k, args.method, args.estimator, args.breakdown))
        return 0
    for name, runner in (
        ("plain", plain_runner(spec, wl, args.k)),
        (
            f"balancedmix {args.method} ({args.estimator}, capture={args.capture})",
            balanced_runner(spec, wl, args.k, args.method, args.estimator, capture=args.capture),
        ),
    ):
        total, table = profile_runner(runner, args.steps)
        print(f"== {name}: {total * 1e3:.1f} ms self CPU per step")
        print(table)
        runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
