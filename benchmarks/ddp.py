"""DDP row: 2 CPU processes (gloo), time per step plain DDP vs balancedmix and bytes communicated.

Runs ``examples/ddp_benchmark.py`` (owned by the distributed work) under ``torchrun`` and turns
its result into a table: every variant's median step time as a ratio to plain DDP, and the
payload each mode hands to the collectives per rank and step (DDP's own all-reduce of P float32
and balancedmix's ``comm_bytes``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .common import fmt_bytes, fmt_ratio

__all__ = ["run"]

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ddp_benchmark.py"


def run(quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    if not SCRIPT.exists():
        return {"suite": "ddp", "rows": [], "tables": [], "targets": [], "notes": [], "skipped": [f"DDP row: {SCRIPT} not found"]}
    spec = importlib.util.spec_from_file_location("_balancedmix_ddp_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    try:
        result = module.launch(steps=max(repeats, 2) if quick else max(repeats, 10), micro=4, tasks=2, timeout=300 if quick else 600)
    except Exception as exc:  # noqa: BLE001 - report, do not abort the other suites
        return {"suite": "ddp", "rows": [], "tables": [], "targets": [], "notes": [], "skipped": [f"DDP row failed: {exc}"]}
    rows = result["rows"]
    base = next(r["ms_per_step_median"] for r in rows if r["variant"] == "plain")
    base_bytes = next(r["total_bytes_per_step"] for r in rows if r["variant"] == "plain")
    for r in rows:
        r["ratio_s"] = fmt_ratio(r["ms_per_step_median"] / base)
        r["bytes_s"] = fmt_bytes(r["total_bytes_per_step"])
        r["bytes_ratio"] = fmt_ratio(r["total_bytes_per_step"] / base_bytes) if base_bytes else "—"
    columns = [("variant", "variant"), ("median ms/step", "ms_per_step_median"), ("× plain", "ratio_s"),
               ("DDP bytes", "ddp_bytes_per_step"), ("balancedmix bytes", "balancedmix_bytes_per_step"),
               ("total", "bytes_s"), ("bytes × plain", "bytes_ratio")]
    return {
        "suite": "ddp", "rows": rows, "raw": result,
        "tables": [{"caption": "2-process DDP (gloo, CPU): time per step and payload per rank per step", "columns": columns, "rows": rows}],
        "targets": [],
        "notes": [f"examples/ddp_benchmark.py: MLP with P = {rows[0]['params']:,}, {result['micro_batches']} micro-batches, "
                  f"K = {result['tasks']}, world size {result['world_size']}, median of {result['steps']} steps; "
                  "`ddp_*` = DDP's all-reduce plus balancedmix's, `buffers_*` = every micro-step under no_sync and only "
                  "balancedmix's fused buffer all-reduce"],
        "skipped": [],
    }
