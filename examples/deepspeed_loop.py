"""Per-task gradient diagnostics and corrections under DeepSpeed ZeRO-1/2/3 (2 CPU processes).

A tiny random-initialised causal LM learns two synthetic tasks (addition, string reversal).
The ``BalancedOptimizer`` is handed to ``deepspeed.initialize`` and bound to the engine with
``balancedmix.distributed.deepspeed.attach``; the balancing runs as a pre-step hook on ZeRO's
step, on each rank's gradient partition. ZeRO-2/3 reduce every micro-step, so both ranks run the
same task at each micro-step (on different data). Diagnostics are logged on rank 0 only.

Launch (CPU, gloo; ``pip install 'balancedmix[deepspeed]'`` with ``DS_BUILD_OPS=0``):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 examples/deepspeed_loop.py --config examples/deepspeed_zero2.json

``examples/deepspeed_zero1.json`` and ``examples/deepspeed_zero3.json`` select the other stages.
Options: ``--method normalize``, ``--steps N``, ``--jsonl diag.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a GPU machine: remove, DeepSpeed picks CUDA
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from balancedmix import BalancedOptimizer  # noqa: E402
from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from balancedmix.distributed.deepspeed import attach  # noqa: E402
from balancedmix.logger import JSONLLogger  # noqa: E402
from plain_loop import make_example  # noqa: E402  (the same two synthetic tasks; examples/ is the script's folder)

TASKS = ["add", "rev"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON config (examples/deepspeed_zero2.json)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="normalize")
    parser.add_argument("--jsonl", default=None, help="JSONL file of per-step diagnostics (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, seed=args.seed)  # build normally; DeepSpeed partitions it (ZeRO-3)
    rng = random.Random(args.seed + 1000 * rank)  # different data on every rank
    log = JSONLLogger(args.jsonl, overwrite=True) if (args.jsonl and rank == 0) else None
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), tasks=TASKS, method=args.method, on_step=log)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    attach(engine)  # before the first backward
    accum = engine.gradient_accumulation_steps()
    batch_size = engine.train_micro_batch_size_per_gpu()
    schedule = [TASKS[(m * len(TASKS)) // accum] for m in range(accum)]  # the same on every rank
    for step in range(args.steps):
        for task in schedule:
            texts = [make_example(task, rng) for _ in range(batch_size)]
            batch = tok(texts, return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with opt.task(task):
                engine.backward(engine(**batch, labels=labels).loss)  # DeepSpeed divides by accum
            engine.step()  # steps at the accumulation boundary; balancedmix runs first
        d = opt.diagnostics()
        if rank == 0:
            print(
                f"step {step}  "
                + "  ".join(f"|g_{t}| {d[f'grad_norm/{t}']:.3f} share {d[f'update_share/{t}']:.2f}" for t in TASKS)
                + f"  cos {d['cos/add/rev']:+.2f}  buffers {d['buffer_bytes'] / 1e3:.1f} kB/rank"
                + f"  comm {d['comm_bytes']} B",
                flush=True,
            )
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, opt.diagnostics())
    if any(e != everyone[0] for e in everyone):
        raise RuntimeError("diagnostics differ across ranks")
    if rank == 0:
        print(f"ranks agree: {dist.get_world_size()} processes, distributed mode {opt.distributed.last_mode}", flush=True)
    if log is not None:
        log.close()
    diagnostics = opt.diagnostics()
    dist.destroy_process_group()
    return diagnostics


if __name__ == "__main__":
    main()
