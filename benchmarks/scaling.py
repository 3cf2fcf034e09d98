"""Scaling in K on the real model: overhead of ``sum`` and ``pcgrad`` as the number of tasks grows.

The tiny Llama (~10 M) with M = 16 micro-batches of 1×64 tokens per step (the same 1024 tokens
per step as the overhead suite), K ∈ {2, 4, 8, 16}: the plain step (K plays no role in it, it is
timed once) and BalancedOptimizer ``sum`` (raw) and ``pcgrad`` for each K, all interleaved.
Scaling in P is measured by the floor suite (``benchmarks/floor.py``), where balancedmix's own
work is isolated from the model's.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import sys
from typing import Any

import torch

from .common import QUICK_LLAMA, TINY_LLAMA, ModelSpec, Workload, fmt_bytes, fmt_ratio, fmt_ratio_ci, fmt_time, ratio_target, target, time_paired, time_runners
from .runners import balanced_runner, plain_runner

__all__ = ["run"]


def run(
    quick: bool = False, repeats: int = 5, device: str = "cpu", spec: ModelSpec | None = None,
    dtype: torch.dtype = torch.float32, workload: Workload | None = None, ks: tuple[int, ...] | None = None,
    budget_s: float | None = None, precision: float = 0.01,
) -> dict[str, Any]:
    """Overhead of ``sum``/``pcgrad`` as K grows. On CPU paired and interleaved against one plain
    runner (:func:`benchmarks.common.time_paired`, ``budget_s`` for the whole group: default 120,
    quick 3); on CUDA one after another, ``repeats`` steps each."""
    budget_s = budget_s if budget_s is not None else (3.0 if quick else 120.0)
    from balancedmix import available_methods

    spec = spec or (QUICK_LLAMA if quick else TINY_LLAMA)
    workload = workload or (Workload(4, 1, 16) if quick else Workload(16, 1, 64))
    ks = ks or ((2, 4) if quick else (2, 4, 8, 16))
    cuda = device.startswith("cuda")
    kw = dict(device=device, dtype=dtype)
    methods = ["sum"] + (["pcgrad"] if "pcgrad" in available_methods() else [])
    factories = [lambda: plain_runner(spec, workload, 1, **kw)]
    for k in ks:
        for m in methods:
            factories.append(lambda k=k, m=m: balanced_runner(spec, workload, k, m, "raw", **kw))
    if cuda:
        rows = time_runners(factories, repeats, device=device, interleave=False)
    else:
        rows = time_paired(factories, budget_s=budget_s, precision=precision, min_pairs=max(6, repeats), device=device)
    base = rows[0]["median_s"]
    for r in rows:
        if cuda:
            r["ratio"] = r["median_s"] / base
        r["time"] = fmt_time(r["median_s"])
        r["ratio_s"] = fmt_ratio(r["ratio"]) if cuda else fmt_ratio_ci(r)
        r["extra_s"] = fmt_bytes(r.get("extra_bytes"))
        if r["impl"] == "plain":
            r["K"] = "any"
    targets = [target(f"sum/raw ÷ plain, K={r['K']}", r["ratio"], 1.03) if cuda else ratio_target(f"sum/raw ÷ plain, K={r['K']}", r, 1.03)
               for r in rows if r["impl"] == "balancedmix" and r["method"] == "sum"]
    columns = [("K", "K"), ("configuration", "name"), ("median step", "time"),
               ("× plain" if cuda else "× plain, median of pairs [95 % CI]", "ratio_s")] + ([] if cuda else [("pairs", "pairs")]) + [("task buffers", "extra_s")]
    notes = [
        f"model {spec.name} on {device}; {workload.num_microbatches} micro-batches of {workload.batch}×{workload.seq} "
        f"tokens per step (micro-batch m → task m mod K); "
        + (f"median of {repeats} steps, one after another" if cuda else
           f"paired interleaved rounds against one plain runner (ratio per round, median and distribution-free 95 % interval), "
           f"until every half-width ≤ {precision:.0%} or {budget_s:.0f} s for the group"),
    ]
    return {
        "suite": "scaling", "device": device, "model": spec.name, "rows": rows,
        "tables": [{"caption": "Overhead as K grows (real model)", "columns": columns, "rows": rows}],
        "targets": targets, "notes": notes, "skipped": [],
    }


if __name__ == "__main__":
    from pathlib import Path

    from .common import machine_info, render_suite, write_json

    suite = run(quick="--quick" in sys.argv)
    write_json(Path("benchmarks/results/scaling/scaling.json"), {"machine": machine_info(), "scaling": suite})
    print(render_suite("Scaling in K (CPU)", suite))
