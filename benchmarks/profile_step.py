"""Where balancedmix's overhead goes: ``torch.profiler`` of one plain step and one balancedmix step.

``python benchmarks/profile_step.py [--quick] [--method sum] [--estimator raw] [--k 4]`` prints,
for the same micro-batches, the self CPU time per step and the top operators by self CPU time
of a plain step and of a balancedmix step. balancedmix's own work shows up as the extra
``aten::copy_`` / ``aten::add_`` calls (the gradient hooks filling the task buffers: one per
parameter per micro-batch) and the ``aten::mm`` / ``aten::mv`` of ``step()`` (Gram, clip-check
dots, combine).
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--method", default="sum")
    parser.add_argument("--estimator", default="raw", choices=("raw", "split"))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    spec = QUICK_LLAMA if args.quick else TINY_LLAMA
    wl = QUICK_WORKLOAD if args.quick else FULL_WORKLOAD
    for name, runner in (
        ("plain", plain_runner(spec, wl, args.k)),
        (f"balancedmix {args.method} ({args.estimator})", balanced_runner(spec, wl, args.k, args.method, args.estimator)),
    ):
        total, table = profile_runner(runner, args.steps)
        print(f"== {name}: {total * 1e3:.1f} ms self CPU per step")
        print(table)
        runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
