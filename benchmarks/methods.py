"""Methods and anchors suite: balancedmix corrections vs the reference implementations.

Same model, same K, same data. For K = 2, 4, 8: the plain step, balancedmix ``pcgrad`` and
``mgda`` (task-homogeneous micro-batches, one backward each) and the K-backward PCGrad
reference (mixed chunks, one backward per task with ``retain_graph``, pairwise projections on
flattened gradients). At K = 4 also balancedmix ``cagrad``/``upgrad``,
torchjd (``mtl_backward`` + ``jac_to_grad`` with its ``PCGrad``/``UPGrad`` aggregators) and
LibMTL's ``PCGrad`` weighting. Methods not registered in ``balancedmix.available_methods()``
and anchors that are not installed are listed as skipped.

Agreement: every implementation runs one step with an optimizer that only records the combined
gradient (no update), all PCGrad implementations forced to the same (identity) task order, and
the combined updates are compared (relative L2 difference; target 1e-5 where the algorithm is
the same).

Run directly: ``python benchmarks/methods.py [--quick] [--repeats N] [--out DIR]``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from collections.abc import Callable
from typing import Any

import torch

from .common import (QUICK_LLAMA, TINY_LLAMA, ModelSpec, Runner, Workload, fmt_ratio, fmt_ratio_ci, fmt_time, pair_ratio_row,
                     ratio_target, rel_diff, target, time_paired, time_runners)
from .overhead import FULL_WORKLOAD, QUICK_WORKLOAD
from .runners import (
    balanced_runner,
    fixed_task_order,
    libmtl_runner,
    libmtl_version,
    plain_runner,
    reference_pcgrad_runner,
    torchjd_available,
    torchjd_runner,
)

__all__ = ["run", "agreement"]

AGREEMENT_TOL = 1e-5


def _available() -> tuple[str, ...]:
    from balancedmix import available_methods

    return tuple(available_methods())


def _factories(
    spec: ModelSpec, workload: Workload, k: int, extended: bool, device: str, dtype: torch.dtype, skipped: list[str], inner: str = "adamw"
) -> list[tuple[str, Callable[[], Runner]]]:
    """(key, factory) pairs of every configuration measured at this K."""
    kw = dict(device=device, dtype=dtype, inner=inner)
    avail = _available()
    out: list[tuple[str, Callable[[], Runner]]] = [("plain", lambda: plain_runner(spec, workload, k, **kw))]
    methods = ["pcgrad", "mgda"] + (["cagrad", "upgrad"] if extended else [])
    for m in methods:
        if m in avail:
            out.append((f"bm:{m}", lambda m=m: balanced_runner(spec, workload, k, m, "raw", **kw)))
        else:
            skipped.append(f"balancedmix {m} at K={k}: method not registered (available: {', '.join(avail)})")
    out.append(("ref:pcgrad", lambda: reference_pcgrad_runner(spec, workload, k, **kw)))
    if extended:
        if torchjd_available():
            for agg in ("PCGrad", "UPGrad"):
                out.append((f"torchjd:{agg.lower()}", lambda agg=agg: torchjd_runner(spec, workload, k, agg, **kw)))
        else:
            skipped.append("torchjd: not installed (pip install -c constraints.txt torchjd)")
        if libmtl_version():
            out.append(("libmtl:pcgrad", lambda: libmtl_runner(spec, workload, k, "PCGrad", **kw)))
        else:
            skipped.append("LibMTL: not installed (pip install --no-deps -c constraints.txt LibMTL)")
    return out


def agreement(spec: ModelSpec, workload: Workload, k: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """One captured step of each implementation; relative differences of the combined updates."""
    skipped: list[str] = []
    captured: dict[str, torch.Tensor] = {}
    if not device.startswith("cuda"):
        # float64 model on CPU: the anchors then compute in float64 (LibMTL allocates its [K, P]
        # matrix in the default dtype), so the comparison tests the algorithms, not the float32
        # rounding of dot products over P ~ 1e7 elements; balancedmix keeps its float32 buffers.
        dtype = torch.float64
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype == torch.float64 else default)
    try:
        _capture(spec, workload, k, device, dtype, skipped, captured)
    finally:
        torch.set_default_dtype(default)
    return _compare(k, captured)


def _capture(spec: ModelSpec, workload: Workload, k: int, device: str, dtype: torch.dtype, skipped: list[str],
             captured: dict[str, torch.Tensor]) -> None:
    with fixed_task_order():
        factories = _factories(spec, workload, k, True, device, dtype, skipped, inner="capture")
        if torchjd_available():  # torchjd regularises the UPGrad QP (reg_eps=1e-4) by default: nearly switch it off
            factories = [(key, f) for key, f in factories if key != "torchjd:upgrad"] + [(
                "torchjd:upgrad",
                lambda: torchjd_runner(spec, workload, k, "UPGrad", device=device, dtype=dtype, inner="capture",
                                       aggregator_options={"reg_eps": 1e-12, "norm_eps": 0.0}),
            )]
        compared = {"plain", "bm:pcgrad", "bm:upgrad", "ref:pcgrad", "torchjd:pcgrad", "torchjd:upgrad", "libmtl:pcgrad"}
        for key, factory in [(key, f) for key, f in factories if key in compared]:
            r = factory()
            r.step()
            captured[key] = r.optimizer.captured  # type: ignore[attr-defined]
            r.close()


def _compare(k: int, captured: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    pairs = [
        ("bm:pcgrad", "ref:pcgrad", "PCGrad: balancedmix vs K-backward reference", True),
        ("torchjd:pcgrad", "ref:pcgrad", "PCGrad: torchjd vs K-backward reference", True),
        ("libmtl:pcgrad", "ref:pcgrad", "PCGrad: LibMTL vs K-backward reference", True),
        ("bm:pcgrad", "torchjd:pcgrad", "PCGrad: balancedmix vs torchjd", True),
        ("bm:upgrad", "torchjd:upgrad", "UPGrad: balancedmix vs torchjd", True),
        ("ref:pcgrad", "plain", "PCGrad reference vs plain sum (size of the correction, not an agreement)", False),
    ]
    rows = []
    for a, b, label, same in pairs:
        if a in captured and b in captured:
            d = rel_diff(captured[a], captured[b])
            rows.append({"K": k, "check": label, "rel_diff": d, "same_algorithm": same,
                         "agrees": (d <= AGREEMENT_TOL) if same else None})
    return rows


def run(
    quick: bool = False,
    repeats: int = 5,
    ks: tuple[int, ...] | None = None,
    device: str = "cpu",
    spec: ModelSpec | None = None,
    dtype: torch.dtype = torch.float32,
    workload: Workload | None = None,
    extended_k: int = 4,
    budget_s: float | None = None,
    precision: float = 0.01,
) -> dict[str, Any]:
    """Run the methods/anchors suite; returns the suite dict.

    On CPU each K group is timed paired and interleaved (:func:`benchmarks.common.time_paired`,
    at least ``max(6, repeats)`` rounds, then until every ratio to plain has a half-width ``≤
    precision`` or ``budget_s`` seconds per K are spent: default 90, quick 3); the speed-up targets
    are paired ratios between two configurations of the same rounds, with their intervals."""
    budget_s = budget_s if budget_s is not None else (3.0 if quick else 90.0)
    spec = spec or (QUICK_LLAMA if quick else TINY_LLAMA)
    workload = workload or (QUICK_WORKLOAD if quick else FULL_WORKLOAD)
    ks = ks or ((2, 4) if quick else (2, 4, 8))
    cuda = device.startswith("cuda")
    skipped: list[str] = []
    rows: list[dict[str, Any]] = []
    for k in ks:
        pairs = _factories(spec, workload, k, k == extended_k, device, dtype, skipped)
        if cuda:
            group = time_runners([f for _, f in pairs], repeats, device=device, interleave=False)
        else:
            group = time_paired([f for _, f in pairs], budget_s=budget_s, precision=precision, min_pairs=max(6, repeats), device=device)
        for (key, _), r in zip(pairs, group):
            r["key"] = key
        base = group[0]["median_s"]
        ref_row = next((r for r in group if r["key"] == "ref:pcgrad"), None)
        for r in group:
            if cuda:
                r["ratio"] = r["median_s"] / base
                r["speedup_vs_ref"] = (ref_row["median_s"] / r["median_s"]) if ref_row else None
                r["ref_s"] = fmt_ratio(r["speedup_vs_ref"])
            else:
                sp = pair_ratio_row(ref_row, r) if ref_row else None
                r["speedup_vs_ref"] = sp["ratio"] if sp else None
                r["ref_s"] = fmt_ratio_ci(sp) if sp else "—"
            r["time"] = fmt_time(r["median_s"])
            r["ratio_s"] = fmt_ratio(r["ratio"]) if cuda else fmt_ratio_ci(r)
        rows += group
    checks: list[dict[str, Any]] = []
    check_ks = (2, extended_k) if extended_k in ks else (ks[0],)
    for k in sorted(set(check_ks)):
        checks += agreement(spec, workload, k, device=device, dtype=dtype)

    def row(k: int, key: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["K"] == k and r["key"] == key), None)

    def tgt(name: str, k: int, num: str, den: str, limit: float, kind: str) -> dict[str, Any]:
        a, b = row(k, num), row(k, den)
        if cuda or a is None or b is None:
            value = a["median_s"] / b["median_s"] if a is not None and b is not None else None
            return target(name, value, limit, kind) if cuda else ratio_target(name, None, limit, kind)
        return ratio_target(name, pair_ratio_row(a, b), limit, kind)

    targets = []
    kt = extended_k if extended_k in ks else ks[0]
    targets.append(tgt(f"reference PCGrad ÷ balancedmix pcgrad, K={kt}", kt, "ref:pcgrad", "bm:pcgrad", 3.5, ">="))
    targets.append(tgt(f"torchjd PCGrad ÷ balancedmix pcgrad, K={kt}", kt, "torchjd:pcgrad", "bm:pcgrad", 2.0, ">="))
    targets.append(tgt(f"torchjd UPGrad ÷ balancedmix upgrad, K={kt}", kt, "torchjd:upgrad", "bm:upgrad", 2.0, ">="))
    targets.append(tgt(f"LibMTL PCGrad ÷ balancedmix pcgrad, K={kt}", kt, "libmtl:pcgrad", "bm:pcgrad", 2.0, ">="))
    for k in ks:
        targets.append(tgt(f"reference ÷ balancedmix pcgrad ≥ 0.8·K, K={k}", k, "ref:pcgrad", "bm:pcgrad", 0.8 * k, ">="))
    for k in ks:
        targets.append(tgt(f"balancedmix pcgrad ÷ plain, K={k}", k, "bm:pcgrad", "plain", 1.05, "<="))
    for c in checks:
        if c["same_algorithm"]:
            targets.append(target(f"agreement (rel. diff) K={c['K']}: {c['check']}", c["rel_diff"], AGREEMENT_TOL))
    versions = {"torchjd": torchjd_available(), "LibMTL": libmtl_version()}
    notes = [
        f"model {spec.name} (P = {rows[0]['P']:,}) on {device}, {workload.num_microbatches} micro-batches of "
        f"{workload.batch}×{workload.seq} tokens per step, AdamW; "
        + (f"paired interleaved rounds per K group after 1 warm-up (ratio per round, median and distribution-free 95 % "
           f"interval), until every ratio to plain has a half-width ≤ {precision:.0%} or {budget_s:.0f} s per K (at least "
           f"{max(6, repeats)} rounds)" if not cuda else f"median of {repeats} timed steps, one configuration after another"),
        f"anchor versions: torchjd {versions['torchjd']}, LibMTL {versions['LibMTL']} (installed with --no-deps; only "
        "its weighting modules are imported — LibMTL/__init__ needs torchvision)",
        "balancedmix: one backward per task-homogeneous micro-batch, the correction computed from the K×K Gram of the "
        "task buffers; reference and torchjd: the same samples regrouped into M mixed chunks (one forward each, then "
        "one backward per task present, resp. one vmapped backward over the K task losses); LibMTL: one forward of "
        "the whole step batch and K backward passes (its API has no gradient accumulation)",
        "agreement checks: one step with a gradient-recording optimizer, all PCGrad implementations forced to the "
        "identity task order (their random orders differ otherwise), the model in float64 on CPU (balancedmix's task "
        "buffers stay float32); MGDA is not compared (torchjd and LibMTL solve it "
        "approximately with Frank–Wolfe, balancedmix exactly)",
    ]
    columns = [("K", "K"), ("configuration", "name"), ("median step", "time"),
               ("× plain" if cuda else "× plain, median of pairs [95 % CI]", "ratio_s"),
               ("reference ÷ this" if cuda else "reference ÷ this [95 % CI]", "ref_s")] + ([] if cuda else [("pairs", "pairs")])
    return {
        "suite": "methods",
        "device": device,
        "model": spec.name,
        "versions": versions,
        "rows": rows,
        "agreement": checks,
        "tables": [
            {"caption": "Time per training step: balancedmix corrections vs the anchors", "columns": columns, "rows": rows},
            {"caption": "Agreement of the combined update (relative L2 difference, one step, same task order)",
             "columns": [("K", "K"), ("check", "check"), ("rel. diff", "rel_diff"), ("same algorithm", "same_algorithm"), ("agrees (≤ 1e-5)", "agrees")],
             "rows": checks},
        ],
        "targets": targets,
        "notes": notes,
        "skipped": sorted(set(skipped)),
    }


def main(argv: list[str] | None = None) -> int:
    from .common import suite_main

    return suite_main("methods", "Methods vs anchors (CPU)", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
