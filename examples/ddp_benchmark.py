"""Time per optimizer step and bytes communicated per step: plain DDP vs balancedmix (2 processes).

Run under torchrun (prints one JSON object on rank 0):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 examples/ddp_benchmark.py \
        [--steps 10] [--budget 120] [--variants plain,ddp_sum,...] [--json out.json]

or from Python (spawns the processes, returns the parsed result)::

    from examples.ddp_benchmark import launch
    result = launch(budget_s=60)       # {"rows": [...], "steps": rounds, ...}

Model: an MLP 256-1024-512-256 (P = 919,296 parameters), batch 32 per micro-batch, M
micro-batches per step, K tasks. Every variant is built up front (its own copy of the model,
same seed) and timed in paired, interleaved rounds (one step of each per round, the order
reversed every other round; a step's time is the slowest rank's), until every ratio's 95 %
interval has a half-width ≤ ``--precision`` or ``--budget`` seconds are spent
(``benchmarks.common.PairedTimer``). Variants:

- ``plain``: DDP with the usual accumulation (``no_sync`` on the first M-1 micro-steps, DDP's
  all-reduce on the last), a plain ``torch.optim.SGD``.
- ``ddp_sum`` / ``ddp_normalize``: the same loop with ``BalancedOptimizer(sync="ddp")``: DDP's
  all-reduce plus balancedmix's buffer all-reduce.
- ``buffers_sum`` / ``buffers_normalize``: every micro-step under ``no_sync``, ``sync="buffers"``:
  balancedmix's buffer all-reduce only.
- ``overlap_sum`` / ``overlap_normalize``: the ``ddp_*`` loop with
  ``balancedmix.distributed.ddp_overlap.attach(model, opt)``: DDP's bucketed all-reduce carries the
  K task rows' columns (a communication hook) instead of ``p.grad``; no buffer all-reduce after
  the backward.
  (DDP variants: each rank with a different task order; ratios against ``plain``.)
- ``fsdp2_plain``: ``fully_shard`` on each linear layer and the root (``Shard(0)`` over the 2
  ranks), FSDP2's gradient sync at every micro-step (the mode balancedmix needs under FSDP2),
  plain SGD: the FSDP2 baseline.
- ``fsdp2_accum``: the usual accumulation, ``set_requires_gradient_sync(False)`` before the last
  micro-step (one reduce-scatter per step): what syncing every micro-step costs.
- ``fsdp2_sum`` / ``fsdp2_normalize``: ``BalancedOptimizer`` on the sharded parameters, the
  same task at each micro-step on every rank; task buffers of the local shard.

Bytes are the payload handed to the gradient collectives per rank and step (DDP: P float32, none in the overlap variants, whose hook replaces it;
FSDP2: a reduce-scatter of P float32 per synced micro-step; balancedmix: its ``comm_bytes``
diagnostic; FSDP2's parameter all-gathers are the same with and without balancedmix and not
counted), and each rank's task buffers (``buffer_bytes`` diagnostic, the largest rank's). A ring all-reduce moves about ``2 (w-1)/w`` times the payload
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common (the paired-timing statistics)

VARIANTS = ("plain", "ddp_sum", "ddp_normalize", "buffers_sum", "buffers_normalize", "overlap_sum", "overlap_normalize",
            "fsdp2_plain", "fsdp2_accum", "fsdp2_sum", "fsdp2_normalize")
#: DeepSpeed ZeRO variants (``--variants``; the benchmark suite adds them when DeepSpeed and
#: ``balancedmix.distributed.deepspeed`` are importable)
ZERO_VARIANTS = ("zero2_plain", "zero2_sum", "zero2_normalize", "zero3_plain", "zero3_sum", "zero3_normalize")
#: each variant's baseline: its ratio is taken against this variant's time in the same round
BASELINE = {"plain": None, "ddp_sum": "plain", "ddp_normalize": "plain", "buffers_sum": "plain",
            "buffers_normalize": "plain", "overlap_sum": "plain", "overlap_normalize": "plain", "fsdp2_plain": None, "fsdp2_accum": "fsdp2_plain",
            "fsdp2_sum": "fsdp2_plain", "fsdp2_normalize": "fsdp2_plain",
            "zero2_plain": None, "zero2_sum": "zero2_plain", "zero2_normalize": "zero2_plain",
            "zero3_plain": None, "zero3_sum": "zero3_plain", "zero3_normalize": "zero3_plain"}


def zero_unavailable() -> str | None:
    """Why the ZeRO variants cannot run here (None when they can)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'balancedmix[deepspeed]')"
    if importlib.util.find_spec("balancedmix.distributed.deepspeed") is None:
        return "this balancedmix has no DeepSpeed engine (balancedmix.distributed.deepspeed)"
    return None


def _mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256))


class _Variant:
    """One configuration: its own copy of the model (same seed), its optimizer, ``step()``."""

    def __init__(self, variant: str, micro: int, num_tasks: int) -> None:
        import torch
        import torch.distributed as dist

        from balancedmix import BalancedOptimizer

        self.variant = variant
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        model = _mlp()
        self.n_params = sum(p.numel() for p in model.parameters())
        self.fsdp = variant.startswith("fsdp2")
        self.zero = int(variant[4]) if variant.startswith("zero") else 0
        self.engine: Any = None
        if self.zero:
            self.module = model
            self.local_numel = -(-self.n_params // world)  # replaced by the partition's size below
        elif self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for i in (0, 2, 4):
                fully_shard(model[i], mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.module = model
            self.local_numel = sum(p.to_local().numel() for p in model.parameters())
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(model)
            self.local_numel = self.n_params
        self.model = model
        inner = torch.optim.SGD(model.parameters(), lr=1e-3)
        tasks = [f"t{k}" for k in range(num_tasks)]
        method = variant.rsplit("_", 1)[-1]
        self.balanced = method not in ("plain", "accum")
        if self.balanced:
            kw = {} if (self.fsdp or self.zero) else {"sync": variant.split("_")[0].replace("overlap", "ddp")}
            self.opt: Any = BalancedOptimizer(inner, tasks=tasks, method=method, **kw)
            if variant.startswith("overlap"):
                from balancedmix.distributed import ddp_overlap

                ddp_overlap.attach(self.module, self.opt)
        else:
            self.opt = inner
        if self.zero:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": micro,
                      "zero_optimization": {"stage": self.zero}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 10**9}
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.opt, config=config)
            if self.balanced:
                from balancedmix.distributed.deepspeed import attach

                attach(self.engine)
            self.local_numel = _zero_partition_numel(self.engine, self.local_numel)
        g = torch.Generator().manual_seed(rank)
        self.data = [(torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)) for _ in range(micro)]
        # DDP: each rank its own task order (attribution is local); FSDP2: the same task at each
        # micro-step on every rank (its reduce-scatter averages the ranks)
        self.schedule = [tasks[(i + (0 if (self.fsdp or self.zero) else rank)) % num_tasks] for i in range(micro)]
        self.micro = micro

    def step(self) -> None:
        micro = self.micro
        if self.zero:  # DeepSpeed divides the loss by its accumulation steps and steps at the boundary
            for i, (x, y) in enumerate(self.data):
                with self.opt.task(self.schedule[i]) if self.balanced else nullcontext():
                    self.engine.backward(((self.engine(x) - y) ** 2).mean())
                self.engine.step()
            return
        for i, (x, y) in enumerate(self.data):
            last = i == micro - 1
            if self.fsdp:
                ctx: Any = nullcontext()
                if self.variant == "fsdp2_accum":  # the usual accumulation: reduce-scatter only at the last micro-step
                    self.module.set_requires_gradient_sync(last)
            else:
                no_sync = self.variant.startswith("buffers") or not last
                ctx = self.module.no_sync() if no_sync else nullcontext()
            with ctx:
                with self.opt.task(self.schedule[i]) if self.balanced else nullcontext():
                    (((self.module(x) - y) ** 2).mean() / micro).backward()
        self.opt.step()
        self.opt.zero_grad()

    def info(self, world: int) -> dict[str, Any]:
        """Bytes per rank and step: the engine's gradient collectives, balancedmix's, the task buffers."""
        import torch
        import torch.distributed as dist

        p4 = self.n_params * 4
        if self.fsdp:  # reduce-scatter of the P float32 gradients: every micro-step, or once (accum)
            engine = p4 * (1 if self.variant == "fsdp2_accum" else self.micro)
        elif self.zero:  # ZeRO-2/3 reduce the gradients at every micro-step
            engine = p4 * self.micro
        else:  # overlap: DDP's all-reduce carries balancedmix's rows instead of p.grad (counted in comm_bytes)
            engine = 0 if self.variant.startswith(("buffers", "overlap")) else p4
        local_max = torch.tensor([float(self.local_numel)], dtype=torch.float64)
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX)
        row: dict[str, Any] = {
            "variant": self.variant, "engine": f"zero{self.zero}" if self.zero else ("fsdp2" if self.fsdp else "ddp"), "baseline_variant": BASELINE[self.variant],
            "params": self.n_params, "local_numel_max": int(local_max.item()),
            "engine_grad_bytes_per_step": int(engine), "ddp_bytes_per_step": 0 if (self.fsdp or self.zero) else int(engine),
            "balancedmix_bytes_per_step": 0, "buffer_bytes_per_rank": 0,
        }
        if self.balanced:
            d = self.opt.diagnostics()
            row["balancedmix_bytes_per_step"] = int(d["comm_bytes"])
            row["buffer_bytes_per_rank"] = int(d["buffer_bytes"])
            row["kind"] = getattr(self.opt.distributed, "kind", type(self.opt.distributed).__name__)
        row["total_bytes_per_step"] = row["engine_grad_bytes_per_step"] + row["balancedmix_bytes_per_step"]
        return row

    def close(self) -> None:
        if self.balanced:
            self.opt.remove_hooks()


def _zero_partition_numel(engine: Any, default: int) -> int:
    """Elements of this rank's fp32 gradient partition (ZeRO-1/2: ``single_partition_of_fp32_groups``,
    ZeRO-3: ``fp32_partitioned_groups_flat``); ``default`` when neither is found."""
    zopt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        groups = getattr(zopt, attr, None)
        if groups:
            return int(sum(t.numel() for t in groups))
    return default


def run_paired(variants: list[str], micro: int, num_tasks: int, warmup: int, budget_s: float, precision: float,
               min_pairs: int, max_pairs: int) -> dict[str, Any]:
    """Paired, interleaved rounds (one step of every variant per round, order reversed every other
    round); a step's time is the slowest rank's; rank 0 applies the stopping rule of
    ``benchmarks.common.PairedTimer`` and broadcasts it."""
    import torch
    import torch.distributed as dist

    from benchmarks.common import PairedTimer, paired_fields

    world = dist.get_world_size()
    built = [_Variant(v, micro, num_tasks) for v in variants]
    index = {v: i for i, v in enumerate(variants)}
    baselines = [None if BASELINE[v] is None else index[BASELINE[v]] for v in variants]
    timer = PairedTimer(baselines, precision=precision, budget_s=budget_s, min_pairs=min_pairs, max_pairs=max_pairs)
    for b in built:
        for _ in range(warmup):
            b.step()
    start = time.perf_counter()
    reason = None
    while reason is None:
        times = torch.zeros(len(built), dtype=torch.float64)
        order = range(len(built)) if timer.rounds % 2 == 0 else range(len(built) - 1, -1, -1)
        for i in order:
            dist.barrier()
            t0 = time.perf_counter()
            built[i].step()
            times[i] = time.perf_counter() - t0
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        timer.add_round(times.tolist())
        flag = torch.zeros(1)
        if dist.get_rank() == 0:
            reason = timer.stop_reason(time.perf_counter() - start)
            flag[0] = ["precision", "budget", "max_pairs"].index(reason) + 1 if reason else 0
        dist.broadcast(flag, src=0)
        reason = [None, "precision", "budget", "max_pairs"][int(flag.item())]
    rows = []
    for i, b in enumerate(built):
        row = b.info(world)
        ts = timer.times[i]
        row.update(paired_fields(timer, i))
        row["ms_per_step_median"] = 1000 * statistics.median(ts)
        row["ms_per_step_min"] = 1000 * min(ts)
        row["stop"] = reason
        rows.append(row)
        b.close()
    return {"rows": rows, "pairs": timer.rounds, "stop": reason, "elapsed_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="minimum number of paired rounds (at least 6)")
    parser.add_argument("--max-steps", type=int, default=400, help="at most this many rounds")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of timed rounds at most")
    parser.add_argument("--precision", type=float, default=0.01, help="stop once every ratio's 95%% CI half-width <= this fraction")
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
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS) - set(ZERO_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS + ZERO_VARIANTS)}")
    if any(v.startswith("zero") for v in variants) and zero_unavailable():
        raise SystemExit(f"ZeRO variants requested but {zero_unavailable()}")
    for v in variants:  # a ratio needs its baseline in the same rounds
        if BASELINE[v] is not None and BASELINE[v] not in variants:
            variants.insert(0, BASELINE[v])
    variants = list(dict.fromkeys(variants))
    paired = run_paired(variants, args.micro, args.tasks, args.warmup, args.budget, args.precision,
                        max(6, args.steps), max(args.max_steps, max(6, args.steps)))
    result = {
        "world_size": dist.get_world_size(),
        "micro_batches": args.micro,
        "tasks": args.tasks,
        "steps": paired["pairs"],
        "stop": paired["stop"],
        "budget_s": args.budget,
        "precision": args.precision,
        "elapsed_s": paired["elapsed_s"],
        "backend": "gloo/cpu",
        "rows": paired["rows"],
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


def launch(steps: int = 10, micro: int = 4, tasks: int = 2, nproc: int = 2, timeout: float = 600.0,
           budget_s: float = 120.0, precision: float = 0.01, variants: str | None = None, **_: Any) -> dict[str, Any]:
    """Run this benchmark under ``torchrun --nproc_per_node nproc`` and return rank 0's result.

    ``steps`` is the minimum number of paired rounds, ``budget_s`` the most seconds of rounds.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
        str(Path(__file__).resolve()), "--steps", str(steps), "--micro", str(micro), "--tasks", str(tasks),
        "--budget", str(budget_s), "--precision", str(precision),
    ] + (["--variants", variants] if variants else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"rows"' in line:
            return json.loads(line)  # rc may be -6 at gloo teardown after the result was printed
    raise RuntimeError(f"ddp_benchmark produced no result (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


if __name__ == "__main__":
    main()
