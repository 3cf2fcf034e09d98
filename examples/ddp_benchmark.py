"""Time per optimizer step and bytes communicated per step: plain DDP vs balancedmix (2 processes).

Run under torchrun (prints one JSON object on rank 0):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/ddp_benchmark.py [--steps 20] [--json out.json]

or from Python (spawns torchrun, returns the parsed result)::

    from examples.ddp_benchmark import launch
    result = launch(steps=20)          # {"rows": [...], "params": P, ...}

Model: an MLP 256-1024-512-256 (P = 919,296 parameters), batch 32 per micro-batch, M
micro-batches per step, K tasks, each rank with a different task order. Variants:

- ``plain``: DDP with the usual accumulation (``no_sync`` on the first M-1 micro-steps, DDP's
  all-reduce on the last), a plain ``torch.optim.SGD``.
- ``ddp_sum`` / ``ddp_normalize``: the same loop with ``BalancedOptimizer(sync="ddp")``: DDP's
  all-reduce plus balancedmix's buffer all-reduce.
- ``buffers_sum`` / ``buffers_normalize``: every micro-step under ``no_sync``, ``sync="buffers"``:
  balancedmix's buffer all-reduce only.

Bytes are the payload handed to the collectives per rank and step (DDP: P float32; balancedmix:
its ``comm_bytes`` diagnostic). A ring all-reduce moves about ``2 (w-1)/w`` times the payload
per rank over the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

VARIANTS = ("plain", "ddp_sum", "ddp_normalize", "buffers_sum", "buffers_normalize")


def _run_variant(variant: str, steps: int, warmup: int, micro: int, num_tasks: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from balancedmix import BalancedOptimizer

    rank, _world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256))
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model)
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    tasks = [f"t{k}" for k in range(num_tasks)]
    if variant == "plain":
        opt: Any = inner
    else:
        sync, method = variant.split("_")
        opt = BalancedOptimizer(inner, tasks=tasks, method=method, sync=sync)
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)) for _ in range(micro)]
    schedule = [tasks[(i + rank) % num_tasks] for i in range(micro)]
    times = []
    comm = 0.0
    for step in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(data):
            last = i == micro - 1
            no_sync = variant.startswith("buffers") or not last
            with ddp.no_sync() if no_sync else nullcontext():
                with opt.task(schedule[i]) if variant != "plain" else nullcontext():
                    (((ddp(x) - y) ** 2).mean() / micro).backward()
        opt.step()
        opt.zero_grad()
        elapsed = time.perf_counter() - t0
        if step >= warmup:
            times.append(elapsed)
    ddp_bytes = 0 if variant.startswith("buffers") else n_params * 4
    if variant != "plain":
        comm = opt.diagnostics()["comm_bytes"]
    return {
        "variant": variant,
        "ms_per_step_median": 1000 * statistics.median(times),
        "ms_per_step_min": 1000 * min(times),
        "ddp_bytes_per_step": ddp_bytes,
        "balancedmix_bytes_per_step": int(comm),
        "total_bytes_per_step": int(ddp_bytes + comm),
        "params": n_params,
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step (M)")
    parser.add_argument("--tasks", type=int, default=2, help="number of tasks (K)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="write the result here (rank 0)")
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rows = [_run_variant(v, args.steps, args.warmup, args.micro, args.tasks) for v in args.variants.split(",")]
    result = {
        "world_size": dist.get_world_size(),
        "micro_batches": args.micro,
        "tasks": args.tasks,
        "steps": args.steps,
        "backend": "gloo/cpu",
        "rows": rows,
    }
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    return None


def launch(steps: int = 20, micro: int = 4, tasks: int = 2, nproc: int = 2, timeout: float = 600.0, **_: Any) -> dict[str, Any]:
    """Run this benchmark under ``torchrun --nproc_per_node nproc`` and return rank 0's result."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
        str(Path(__file__).resolve()), "--steps", str(steps), "--micro", str(micro), "--tasks", str(tasks),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"rows"' in line:
            return json.loads(line)  # rc may be -6 at gloo teardown after the result was printed
    raise RuntimeError(f"ddp_benchmark produced no result (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


if __name__ == "__main__":
    main()
