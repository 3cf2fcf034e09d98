"""Distributed rows: 2 CPU processes (gloo), plain engine vs balancedmix on the same batches.

Runs ``examples/ddp_benchmark.py`` under ``python -m torch.distributed.run`` and turns its result
into a table. Engines: DDP (``sync="ddp"``, ``sync="buffers"`` and ``ddp_overlap``) against plain DDP, and FSDP2
(``fully_shard``, gradient sync every micro-step) against plain FSDP2 on the same loop; every
variant's step time as a paired ratio to its engine's plain step with a 95 % interval
(:class:`benchmarks.common.PairedTimer`), the payload each mode hands to the gradient
collectives per rank and step (the engine's and balancedmix's ``comm_bytes``), and each rank's
task-buffer bytes (``R`` rows × the local shard under FSDP2 and ZeRO-2/3, × P under DDP). The
DeepSpeed ZeRO-2/3 rows run when ``deepspeed`` and ``balancedmix.distributed.deepspeed`` are
importable, and are listed as skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .common import fmt_bytes, fmt_ratio, fmt_ratio_ci, ratio_target, target

__all__ = ["run"]

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ddp_benchmark.py"
MICRO, TASKS = 4, 2


def _empty(reason: str) -> dict[str, Any]:
    return {"suite": "ddp", "rows": [], "tables": [], "targets": [], "notes": [], "skipped": [reason]}


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("_balancedmix_ddp_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def zero_skip_reason(module: Any) -> str | None:
    """Why the DeepSpeed ZeRO-2/3 rows cannot be measured here (None when they can)."""
    reason = module.zero_unavailable() if hasattr(module, "zero_unavailable") else "the script has no ZeRO variants"
    return None if reason is None else f"DeepSpeed ZeRO-2/3 rows: {reason}"


def run(quick: bool = False, repeats: int = 5, budget_s: float | None = None, precision: float = 0.01) -> dict[str, Any]:
    """The distributed rows. ``repeats`` = the minimum number of paired rounds (at least 6),
    ``budget_s`` = the most seconds of timed rounds (default 180; quick 5)."""
    if not SCRIPT.exists():
        return _empty(f"DDP row: {SCRIPT} not found")
    budget_s = budget_s if budget_s is not None else (5.0 if quick else 180.0)
    module = _load_script()
    zero_skip = zero_skip_reason(module)
    variants = ",".join(module.VARIANTS + (() if zero_skip else module.ZERO_VARIANTS))
    try:
        result = module.launch(steps=max(repeats, 6), micro=MICRO, tasks=TASKS, budget_s=budget_s, precision=precision,
                               timeout=300 + 2 * budget_s, variants=variants)
    except Exception as exc:  # noqa: BLE001 - report, do not abort the other suites
        return _empty(f"DDP/FSDP2 rows failed: {exc}")
    rows = result["rows"]
    by_name = {r["variant"]: r for r in rows}
    k = result["tasks"]
    for r in rows:
        base = by_name[r["baseline_variant"]] if r.get("baseline_variant") else r
        r["baseline_name"] = "—" if r is base else r["baseline_variant"]
        r["ratio_s"] = fmt_ratio_ci(r)
        r["engine_bytes_s"] = fmt_bytes(r["engine_grad_bytes_per_step"])
        r["bm_bytes_s"] = fmt_bytes(r["balancedmix_bytes_per_step"])
        r["bytes_s"] = fmt_bytes(r["total_bytes_per_step"])
        r["bytes_ratio"] = fmt_ratio(r["total_bytes_per_step"] / base["total_bytes_per_step"]) if base["total_bytes_per_step"] else "—"
        r["buffers_s"] = fmt_bytes(r["buffer_bytes_per_rank"]) if r["buffer_bytes_per_rank"] else "—"
        if r["buffer_bytes_per_rank"]:
            shard = r["local_numel_max"] * 4
            r["buffer_rows"] = r["buffer_bytes_per_rank"] / shard
            r["k_shard_s"] = fmt_bytes(k * shard)
            r["shard_s"] = f"{r['local_numel_max']:,}"
        r["ms"] = round(r["ms_per_step_median"], 2)
    columns = [("engine", "engine"), ("variant", "variant"), ("vs", "baseline_name"), ("median ms/step", "ms"),
               ("× plain engine, median of pairs [95 % CI]", "ratio_s"), ("pairs", "pairs"),
               ("engine gradient bytes", "engine_bytes_s"), ("balancedmix bytes", "bm_bytes_s"), ("total", "bytes_s"),
               ("bytes × plain", "bytes_ratio"), ("task buffers per rank", "buffers_s"), ("rows", "buffer_rows"),
               ("local shard (params)", "shard_s"), ("K × local shard × 4 B", "k_shard_s")]
    targets = []
    if "overlap_sum" in by_name:
        targets.append(ratio_target("DDP: balancedmix sum with ddp_overlap step ÷ plain DDP step (issue 17 item 3)",
                                    by_name["overlap_sum"], 1.15))
        if "ddp_sum" in by_name:
            # the overlapped reduction may not cost more bytes than DDP's all-reduce + the fused row all-reduce
            targets.append(target("DDP: ddp_overlap bytes per step ÷ sync='ddp' bytes per step",
                                  by_name["overlap_sum"]["total_bytes_per_step"] / by_name["ddp_sum"]["total_bytes_per_step"], 1.0, "<="))
    elif "ddp_sum" in by_name:
        targets.append(ratio_target("DDP: balancedmix sum (sync='ddp') step ÷ plain DDP step (issue 17 item 3)", by_name["ddp_sum"], 1.15))
    for engine, label in (("fsdp2", "FSDP2"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3")):
        bal = [r for r in rows if r["engine"] == engine and r["buffer_bytes_per_rank"]]
        if bal:
            # documented (docs/distributed.md): R = K task rows + 1 untagged row, each of the local shard
            sharded = all(r["buffer_bytes_per_rank"] == (k + 1) * r["local_numel_max"] * 4
                          and r["local_numel_max"] < r["params"] for r in bal)
            targets.append(target(f"{label}: task buffers per rank == (K + 1) rows × local shard × 4 B, local shard < P (1 = yes)",
                                  1.0 if sharded else 0.0, 1.0, ">="))
    for engine, plain in (("zero2", "zero2_plain"), ("zero3", "zero3_plain")):
        if plain not in by_name and not zero_skip:
            zero_skip = f"DeepSpeed {engine} rows: not in the result"
    skipped = [zero_skip] if zero_skip else []
    notes = [
        f"examples/ddp_benchmark.py: MLP with P = {rows[0]['params']:,}, {result['micro_batches']} micro-batches of 32 rows "
        f"per rank, K = {k}, world size {result['world_size']}, gloo on CPU, 1 thread per process; every variant built "
        f"up front and timed in {result['steps']} paired interleaved rounds (order reversed every other round; a step's "
        f"time is the slowest rank's; stopped by: {result['stop']}, budget {result['budget_s']:.0f} s, "
        f"precision {result['precision']:.0%})",
        "DDP: `ddp_*` = DDP's all-reduce plus balancedmix's, `buffers_*` = every micro-step under no_sync and only "
        "balancedmix's fused buffer all-reduce, `overlap_*` = `ddp_*` with `ddp_overlap.attach(model, opt)`: DDP's "
        "bucketed all-reduce in the last backward carries the K task rows (a communication hook) instead of p.grad, "
        "nothing is all-reduced after the backward but the small agreement vector; each rank runs its own task order. FSDP2: `fully_shard` per linear "
        "layer and on the root, `fsdp2_plain` syncs every micro-step (the mode balancedmix needs), `fsdp2_accum` "
        "reduce-scatters once per step (the usual accumulation, for reference); the same task at each micro-step on "
        "both ranks. ZeRO-2/3: `deepspeed.initialize` with a torch SGD (plain) or the BalancedOptimizer bound with "
        "`balancedmix.distributed.deepspeed.attach` (DS_ACCELERATOR=cpu, fp32, gradient_accumulation_steps = M), the "
        "same task at each micro-step on both ranks",
        "bytes = payload handed to the gradient collectives per rank and step: DDP's all-reduce (4·P; 0 in `overlap_*`, "
        "whose hook sends balancedmix's K·4·P instead), FSDP2's "
        "reduce-scatter (4·P per synced micro-step; its parameter all-gathers are the same with and without "
        "balancedmix and are not counted), ZeRO-2/3's gradient reduction (4·P per micro-step; ZeRO-3's parameter "
        "all-gathers not counted), balancedmix's `comm_bytes`; task buffers = `buffer_bytes` (the largest "
        "rank's), rows = K task rows + 1 untagged row",
    ]
    return {
        "suite": "ddp", "rows": rows, "raw": result,
        "tables": [{"caption": "2 processes (gloo, CPU): DDP and FSDP2, plain engine vs balancedmix on the same batches",
                    "columns": columns, "rows": rows}],
        "targets": targets, "notes": notes, "skipped": skipped,
    }
