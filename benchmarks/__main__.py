"""``python -m benchmarks run [--suite cpu|gpu|all] [--out DIR] [--quick] [--repeats N] [--only NAMES] [--update-docs [--base DIR]]``.

Writes ``DIR/results.json`` (machine, every suite's rows, targets, notes) and ``DIR/results.md``
(the markdown tables that ``docs/benchmarks.md`` includes; ``--update-docs`` copies them between
the result markers of that page). A subset (``--only``) updates the docs by merging into a full
run's results (``--base benchmarks/results/cpu``): its suites replace the base's, the page says
which suites were re-run and by which command, and the base's files are rewritten. The gpu suite runs the same measurements on ``cuda`` with a
random-init model of Qwen2.5-0.5B's shape in bf16; without a CUDA device its rows are skipped
and the output says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import common

CPU_SUITES = ("overhead", "methods", "floor", "scaling", "grpo", "ddp", "sketch")
GPU_SUITES = ("overhead", "methods", "floor", "scaling", "sketch")
CAPPED_SUITES = ("methods", "floor")  # default repeats capped at 3 (see main)
TITLES = {
    "overhead": "Overhead: plain AdamW vs BalancedOptimizer (sum)",
    "methods": "Corrections vs the anchors (reference PCGrad, torchjd, LibMTL)",
    "floor": "Step-cost floor and scaling in P",
    "scaling": "Scaling in K",
    "grpo": "GRPO step",
    "ddp": "Distributed (DDP, 2 processes)",
    "sketch": "Sketch mode (sketch_dim) vs exact mode and the plain optimizer",
}
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


PAIRED_SUITES = ("overhead", "methods", "scaling", "ddp", "sketch")  # ratios with intervals; take --budget


def run_cpu_suite(name: str, quick: bool, repeats: int, budget_s: float | None = None) -> dict[str, Any]:
    if name == "overhead":
        from .overhead import run
    elif name == "methods":
        from .methods import run
    elif name == "floor":
        from .floor import run
    elif name == "scaling":
        from .scaling import run
    elif name == "grpo":
        from .grpo import run
    elif name == "ddp":
        from .ddp import run
    elif name == "sketch":
        from .sketch import run
    else:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(CPU_SUITES)}")
    if name in PAIRED_SUITES and budget_s is not None:
        return run(quick=quick, repeats=repeats, budget_s=budget_s)
    return run(quick=quick, repeats=repeats)


def run_gpu_suite(name: str, quick: bool, repeats: int) -> dict[str, Any]:
    """The GPU variant of a suite, or a skipped entry when no CUDA device is present."""
    if not torch.cuda.is_available():
        return {"suite": name, "device": "cuda", "rows": [], "tables": [], "targets": [], "notes": [],
                "skipped": [f"{name}: no CUDA device on this machine (torch.cuda.is_available() is False); GPU rows skipped"]}
    from .common import QUICK_LLAMA, QWEN_05B, Workload

    spec = QUICK_LLAMA if quick else QWEN_05B
    workload = Workload(4, 2, 32) if quick else Workload(8, 2, 512)
    kw: dict[str, Any] = dict(quick=quick, repeats=repeats, device="cuda", spec=spec, dtype=torch.bfloat16, workload=workload)
    if name == "overhead":
        from .overhead import run

        return run(**kw)
    if name == "methods":
        from .methods import run

        return run(**kw, ks=(2, 4) if quick else (2, 4, 8))
    if name == "floor":
        from .floor import run

        return run(quick=quick, repeats=repeats, device="cuda")
    if name == "scaling":
        from .scaling import run

        return run(**{**kw, "workload": Workload(4, 1, 32) if quick else Workload(16, 1, 512)})
    if name == "sketch":
        from .sketch import GPU_DIMS, QUICK_DIMS, run

        return run(**kw, dims=QUICK_DIMS if quick else GPU_DIMS)
    raise ValueError(f"unknown gpu suite {name!r}; choose from {', '.join(GPU_SUITES)}")


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = m.get("gpu")
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m.get('mem_total_gib', '?')} GiB), torch {m['torch']}, "
        f"{m['torch_threads']} threads" + (f", GPU {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else ", no GPU")
        + f"; load average at start {m.get('load_average')}; command `{results['command']}`; "
        f"{results['elapsed_s']:.0f} s.",
        "",
    ]
    for rerun in results.get("reruns", []):
        lines[-1:-1] = [
            f"Re-run since, replacing their tables: {', '.join(rerun['suites'])} — command `{rerun['command']}`, "
            f"{rerun['date']}, load average at start {rerun.get('load_average')}, {rerun['elapsed_s']:.0f} s.",
        ]
    for group in ("cpu", "gpu"):
        for name, suite in results["suites"].get(group, {}).items():
            lines.append(common.render_suite(f"{TITLES.get(name, name)} ({group.upper()})", suite))
    return "\n".join(lines)


def update_docs(markdown: str, suite: str, path: Path = DOCS) -> None:
    """Replace the text between ``<!-- results:SUITE:begin -->`` and ``...:end -->`` in ``path``."""
    begin, end = f"<!-- results:{suite}:begin -->", f"<!-- results:{suite}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers")
    for marker in (begin, end):
        if text.count(marker) != 1:
            raise ValueError(f"{path} has {text.count(marker)} {marker} markers (exactly one expected): "
                             "the text between repeated markers would survive the update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{markdown.rstrip()}\n{end}{tail}")


def merge_into_base(results: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The full run in ``base_dir/results.json`` with the suites of ``results`` (an ``--only`` run)
    put in place of its own; the re-run is recorded under ``reruns`` (command, date, load)."""
    path = base_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no full run to merge into: {path} does not exist (run without --only first)")
    base = json.loads(path.read_text())
    names: list[str] = []
    for group, suites in results["suites"].items():
        for name, suite in suites.items():
            base.setdefault("suites", {}).setdefault(group, {})[name] = suite
            names.append(f"{group}/{name}")
    # an earlier re-run no longer describes the suites replaced now
    for rerun in base.get("reruns", []):
        rerun["suites"] = [n for n in rerun["suites"] if n not in names]
    base["reruns"] = [r for r in base.get("reruns", []) if r["suites"]]
    base["reruns"].append({
        "command": results["command"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": results["machine"].get("load_average"), "elapsed_s": results["elapsed_s"], "suites": names,
    })
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run benchmark suites and write results.json / results.md")
    p.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<suite>)")
    p.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run (seconds to minutes)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 5; quick 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of paired timing per group of compared configurations in the overhead, methods, scaling, "
                        "ddp and sketch suites (default 90 per K, 90 per K, 120, 180, 90 per workload; quick 3-5): rounds stop earlier once "
                        "every ratio's 95%% interval has a half-width <= 1%%")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CPU_SUITES)}")
    p.add_argument("--update-docs", action="store_true", help="copy the tables into docs/benchmarks.md")
    p.add_argument("--base", default=None,
                   help="with --only and --update-docs: the full run's output directory (e.g. benchmarks/results/cpu) "
                        "whose results the re-run suites replace before the docs are rewritten")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    repeats = args.repeats or (1 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.budget is not None and args.budget <= 0:
        parser.error("--budget must be > 0 seconds")
    only = None if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    if only:
        unknown = sorted(set(only) - set(CPU_SUITES))
        if unknown:
            parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(CPU_SUITES)}")
        if args.update_docs and args.base is None:
            # the docs hold one block per suite group; a subset alone would silently drop the other tables
            parser.error("--update-docs rewrites the whole results block of docs/benchmarks.md: run it without --only, "
                         "or give --base DIR (a full run's output, e.g. benchmarks/results/cpu) to merge the subset into")
    if args.base is not None and not (only and args.update_docs):
        parser.error("--base is for merging an --only run into a full run with --update-docs")
    groups = ("cpu", "gpu") if args.suite == "all" else (args.suite,)
    default_dir = args.suite if not only else f"{args.suite}-only-{'-'.join(only)}"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default_dir
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": common.machine_info(), "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
                               "quick": args.quick, "repeats": repeats, "suites": {}}
    for group in groups:
        names = CPU_SUITES if group == "cpu" else GPU_SUITES
        results["suites"][group] = {}
        for name in names:
            if only and name not in only:
                continue
            t = time.perf_counter()
            # the anchors cost 2-6 plain steps each and their ratios are large: 3 repeats keep the CPU
            # suite within ~15 min; the overhead suite's few-percent ratios keep the full count
            n = min(repeats, 3) if name in CAPPED_SUITES and args.repeats is None else repeats
            suite = run_cpu_suite(name, args.quick, n, args.budget) if group == "cpu" else run_gpu_suite(name, args.quick, n)
            suite["repeats"] = n
            if group == "cpu" and name in PAIRED_SUITES:
                suite["budget_s"] = args.budget
            suite["elapsed_s"] = time.perf_counter() - t
            results["suites"][group][name] = suite
            print(f"[benchmarks] {group}/{name}: {suite['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
    results["elapsed_s"] = time.perf_counter() - t0
    md = render(results)
    common.write_json(out / "results.json", results)
    (out / "results.md").write_text(md)
    if args.update_docs:
        docs_results = results
        if only:
            base_dir = Path(args.base)
            docs_results = merge_into_base(results, base_dir)
            common.write_json(base_dir / "results.json", docs_results)
            (base_dir / "results.md").write_text(render(docs_results))
        for group in groups:
            update_docs(render({**docs_results, "suites": {group: docs_results["suites"][group]}}), group, path=DOCS)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
