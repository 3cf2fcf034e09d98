"""Step-cost floor and scaling in P: how close balancedmix's own work runs to memory bandwidth.

balancedmix adds two kinds of work to a training step, both memory-bound streams over P:

- per micro-batch, the gradient hooks copy (first write) or add each parameter's gradient into
  the task's float32 buffer row: read P·4 + write P·4 bytes (copy) or read 2·P·4 + write P·4 (add);
- per optimizer step, ``step()``: the Gram of the ``n`` used rows (``data @ data.T``: reads n·P·4),
  the dots of every row with ``p.grad`` for the clip check (reads n·P·4 + P·4) and, unless the
  method leaves the sum unchanged, ``p.grad += Σ_r w_r B_r`` (reads n·P·4 + P·4, writes P·4).

This suite measures both on a synthetic model (parameters totalling P, split in 8 tensors,
whose backward is two elementwise products so that the timings isolate balancedmix's
work) against the machine's measured copy bandwidth ``dst.copy_(src)`` of the same size: the
achieved bytes/s of each part and the ratio ``copy bandwidth ÷ achieved`` (target ≤ 2).

Grid: K ∈ {2, 4, 8, 16} at P = 10 M and P ∈ {1 M, 10 M, 30 M, 100 M} at K = 4 (CPU; ``--quick``
uses P = 100 k); on a GPU P goes to 0.5 B.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import gc
import math
import time
from typing import Any

import torch

from .common import fmt_bytes, fmt_time, median_time, synchronize, target

__all__ = ["run", "copy_bandwidth", "measure"]


class _NoOp(torch.optim.Optimizer):
    """An inner optimizer that does nothing, so that ``BalancedOptimizer.step()`` is timed alone."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def copy_bandwidth(numel: int, device: str = "cpu", repeats: int = 5) -> float:
    """Measured bytes/s of ``dst.copy_(src)`` for float32 tensors of ``numel`` elements (read + write)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats, device)
    del src, dst
    return 2 * numel * 4 / t


def measure(k: int, p_total: int, method: str, device: str = "cpu", repeats: int = 5, num_microbatches: int | None = None) -> dict[str, Any]:
    """Time the hooks (per micro-batch) and ``step()`` of a BalancedOptimizer over P = ``p_total``."""
    from balancedmix import BalancedOptimizer

    n_tensors = 8
    sizes = [p_total // n_tensors] * n_tensors
    sizes[-1] += p_total - sum(sizes)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in sizes]
    w1 = [torch.randn(n, generator=gen).to(device) for n in sizes]
    w2 = [torch.randn(n, generator=gen).to(device) for n in sizes]
    names = [f"task{t}" for t in range(k)]
    m = num_microbatches or k
    # task t's gradient = cos θ_t w1 + sin θ_t w2, θ_t spread over [0°, 120°]: some pairs conflict
    # (the correction has work to do) without the near-total cancellation of antiparallel tasks
    angles = [math.radians(120.0 * t / max(k - 1, 1)) for t in range(k)]

    def loss(t: int) -> torch.Tensor:
        a, b = math.cos(angles[t]), math.sin(angles[t])
        return sum(a * (p * u).sum() + b * (p * v).sum() for p, u, v in zip(params, w1, w2))

    # plain backward vs backward inside opt.task(): the difference is the hooks' copy/add
    def plain_backward() -> None:
        for i in range(m):
            loss(i % k).backward()
        for p in params:
            p.grad = None

    t_plain = median_time(plain_backward, repeats, device)
    opt = BalancedOptimizer(_NoOp(params), tasks=names, method=method)

    def hooked_backward() -> None:
        for i in range(m):
            with opt.task(names[i % k]):
                loss(i % k).backward()

    step_times = []
    hook_times = []
    for rep in range(repeats + 1):
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        t0 = time.perf_counter()
        hooked_backward()
        synchronize(device)
        t1 = time.perf_counter()
        opt.step()
        synchronize(device)
        t2 = time.perf_counter()
        if rep:  # first round is the warm-up (row allocation)
            hook_times.append(t1 - t0)
            step_times.append(t2 - t1)
    rows_used = int(opt.buffers.data.shape[0])
    opt.remove_hooks()
    hook_extra = max(sorted(hook_times)[len(hook_times) // 2] - t_plain, 0.0)
    t_step = sorted(step_times)[len(step_times) // 2]
    n = rows_used
    combine = method != "sum"
    step_bytes = (2 * n * p_total + p_total + (n * p_total + 2 * p_total if combine else 0)) * 4
    ideal_bytes = (n * p_total + (2 * p_total if combine else 0)) * 4  # one fused pass over the rows
    # hooks: the first micro-batch of each task copies, later ones add
    copies = min(m, k)
    adds = m - copies
    hook_bytes = (copies * 2 + adds * 3) * p_total * 4
    bw = copy_bandwidth(min(n * p_total, 64_000_000), device, repeats)  # beyond caches; capped for memory
    del opt, params, w1, w2
    gc.collect()
    return {
        "K": k, "P": p_total, "method": method, "rows": n, "microbatches": m,
        "step_s": t_step, "step_bytes": step_bytes, "step_bw": step_bytes / t_step,
        "step_vs_copy": bw / (step_bytes / t_step), "step_vs_ideal": t_step / (ideal_bytes / bw),
        "hook_extra_s": hook_extra, "hook_bytes": hook_bytes,
        "hook_bw": hook_bytes / hook_extra if hook_extra > 0 else None,
        "hook_vs_copy": (bw / (hook_bytes / hook_extra)) if hook_extra > 0 else None,
        "copy_bw": bw,
        "extra_per_step_s": t_step + hook_extra,
    }


def run(quick: bool = False, repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """Run the floor / P-scaling suite; returns the suite dict."""
    cuda = device.startswith("cuda")
    if quick:
        grid = [(2, 100_000), (4, 100_000)]
    elif cuda:
        grid = [(k, 10_000_000) for k in (2, 4, 8, 16)] + [(4, p) for p in (1_000_000, 30_000_000, 100_000_000, 500_000_000)]
    else:
        grid = [(k, 10_000_000) for k in (2, 4, 8, 16)] + [(4, p) for p in (1_000_000, 30_000_000, 100_000_000)]
    rows = []
    for k, p in grid:
        for method in ("sum", "pcgrad"):
            from balancedmix import available_methods

            if method not in available_methods():
                continue
            r = measure(k, p, method, device=device, repeats=repeats, num_microbatches=max(8, k) if not quick else k)
            r.update({
                "step_t": fmt_time(r["step_s"]), "step_bw_s": f"{r['step_bw'] / 1e9:.2f} GB/s",
                "copy_bw_s": f"{r['copy_bw'] / 1e9:.2f} GB/s", "hook_t": fmt_time(r["hook_extra_s"]),
                "hook_bw_s": "—" if r["hook_bw"] is None else f"{r['hook_bw'] / 1e9:.2f} GB/s",
                "buffers": fmt_bytes(r["rows"] * p * 4),
            })
            rows.append(r)
    targets = []
    for r in rows:
        if r["method"] == "pcgrad" and (r["P"] >= 10_000_000 or quick):
            targets.append(target(f"step() copy-bandwidth ÷ achieved, K={r['K']}, P={r['P']:,}", r["step_vs_copy"], 2.0))
    columns = [("K", "K"), ("P", "P"), ("method", "method"), ("buffer rows", "rows"), ("buffers", "buffers"),
               ("step() time", "step_t"), ("step() GB/s", "step_bw_s"), ("copy GB/s", "copy_bw_s"),
               ("copy ÷ achieved", "step_vs_copy"), ("step ÷ one-pass floor", "step_vs_ideal"),
               ("hooks extra/step", "hook_t"), ("hooks GB/s", "hook_bw_s"), ("micro-batches", "microbatches")]
    notes = [
        "synthetic model: P float32 parameters in 8 tensors, backward = two elementwise products, inner optimizer a no-op;"
        " median of %d repeats" % repeats,
        "step() bytes = Gram (n·P) + clip-check dots (n·P + P) + combine (n·P + 2P, not for `sum`), float32;"
        " 'step ÷ one-pass floor' compares with a single fused pass over the n rows (n·P (+2P) bytes) at copy bandwidth",
        "hooks extra = backward inside opt.task() minus the same backward without the wrapper, per step of the listed"
        " micro-batches (copy on a task's first micro-batch: 2·P·4 bytes, add afterwards: 3·P·4 bytes)",
    ]
    return {
        "suite": "floor", "device": device, "rows": rows,
        "tables": [{"caption": "Step-cost floor and scaling in K and P (balancedmix's own work only)", "columns": columns, "rows": rows}],
        "targets": targets, "notes": notes, "skipped": [],
    }


def main(argv: list[str] | None = None) -> int:
    from .common import suite_main

    return suite_main("floor", "Step-cost floor (CPU)", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
