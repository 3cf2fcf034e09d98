"""Command line: ``balancedmix demo`` (the main job) and ``balancedmix report``."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo.measure import run_measurement

    run_measurement(steps=args.steps, method=args.method, out=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancedmix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="measure per-task gradients on a tiny model and synthetic tasks")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--method", default="sum")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
