"""Per-task gradient diagnostics and corrections under accelerate DDP (2 CPU processes).

A tiny random-initialised causal LM learns two synthetic tasks (addition, string reversal).
Each rank runs a different mix of tasks (rank 0 mostly "add", rank 1 mostly "rev"), with
gradient accumulation through ``accelerator.accumulate()``; ``BalancedOptimizer`` all-reduces
its per-task buffers at the step, so the figures and the update are those of the global batch,
identical on every rank. Diagnostics are logged on the main process only.

Launch (CPU; ``accelerate launch --cpu`` starts one process only, see docs/distributed.md):

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_ddp.py

Options: ``--no-sync`` runs every micro-step under ``accelerator.no_sync`` (one collective per
step instead of DDP's plus ours), ``--method normalize``, ``--jsonl diag.jsonl``, ``--steps N``.
"""

from __future__ import annotations

import argparse
import logging
import random

import torch
import torch.distributed as dist
from accelerate import Accelerator

from balancedmix import BalancedOptimizer
from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm
from balancedmix.logger import JSONLLogger
from plain_loop import make_example  # the same two synthetic tasks (examples/ is the script's folder)

TASKS = ["add", "rev"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step per rank")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="normalize")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--no-sync", action="store_true", help="never let DDP all-reduce; balancedmix does it")
    parser.add_argument("--jsonl", default=None, help="JSONL file of per-step diagnostics (main process)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    rank = accelerator.process_index
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, seed=args.seed)  # same initial weights on every rank
    rng = random.Random(args.seed + 1000 * rank)  # different data on every rank
    log = JSONLLogger(args.jsonl, overwrite=True) if (args.jsonl and accelerator.is_main_process) else None
    # build the wrapper after the process group exists: it detects DDP and fixes its buffer layout
    opt = BalancedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=3e-3),
        tasks=TASKS,
        method=args.method,
        sync="buffers" if args.no_sync else "ddp",
        on_step=log,
    )
    model, prepared_opt = accelerator.prepare(model, opt)
    # rank 0: add, add, add, rev ...; rank 1: rev, rev, rev, add ... (different task subsets per micro-step)
    mix = ["add", "add", "add", "rev"] if rank == 0 else ["rev", "rev", "rev", "add"]
    micro = 0
    for step in range(args.steps):
        for m in range(args.grad_accum):
            task = mix[micro % len(mix)]
            micro += 1
            texts = [make_example(task, rng) for _ in range(args.batch_size)]
            batch = tok(texts, return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with accelerator.accumulate(model):
                no_sync = accelerator.no_sync(model) if args.no_sync else _Nothing()
                with no_sync, opt.task(task):
                    loss = model(**batch, labels=labels).loss
                    accelerator.backward(loss)  # divides by grad_accum
                if accelerator.sync_gradients:
                    opt.synchronize()  # global per-task gradients (and p.grad with --no-sync) before clipping
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                prepared_opt.step()  # runs BalancedOptimizer.step() on the last micro-step only
                prepared_opt.zero_grad()
        d = opt.diagnostics()
        if accelerator.is_main_process:
            print(
                f"step {step}  "
                + "  ".join(f"|g_{t}| {d[f'grad_norm/{t}']:.3f} share {d[f'update_share/{t}']:.2f}" for t in TASKS)
                + f"  cos {d['cos/add/rev']:+.2f}  clip scale {d['grad_scale']:.3f}  comm {d['comm_bytes'] / 1e6:.2f} MB",
                flush=True,
            )
    # every rank computed the same diagnostics from the same reduced numbers
    everyone: list = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, opt.diagnostics())
    if any(e != everyone[0] for e in everyone):
        raise RuntimeError("diagnostics differ across ranks")
    if accelerator.is_main_process:
        print(f"ranks agree: {accelerator.num_processes} processes, distributed mode {opt.distributed.last_mode}", flush=True)
    if log is not None:
        log.close()
    accelerator.end_training()
    return opt.diagnostics()


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


if __name__ == "__main__":
    main()
