"""DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3: per-task gradients of each rank's gradient partition.

Use::

    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), tasks=["math", "code"],
                            method="normalize")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    attach(engine)                      # balancedmix.distributed.deepspeed.attach: once, after initialize
    for batch in micro_batches:         # gradient_accumulation_steps micro-batches per optimizer step
        with opt.task(batch):
            engine.backward(engine(**batch).loss)
        engine.step()                   # DeepSpeed steps at the accumulation boundary
    log(opt.diagnostics())

The wrapper handed to ``deepspeed.initialize`` becomes ZeRO's inner optimizer: ZeRO swaps its
``param_groups`` for the rank's flat fp32 partitions and calls its ``step()`` once per parameter
group, after it has reduced, flattened and clipped the gradients. Balancing must see every group
at once and before the clip, so :func:`attach` re-binds the wrapper to the partitions and installs
the balancing as a **pre-step hook on ZeRO's own ``step()``** (which ``engine.step()`` calls — also
when accelerate calls it inside ``accelerator.backward``); the wrapper's ``step()`` then only
forwards to the inner optimizer. The hook:

1. captures the block still open (under accelerate the step runs inside ``opt.task()``),
2. agrees on the step across ranks (the usual small float64 all-reduce; task-label errors are
   raised on every rank),
3. computes the Gram matrix of the per-task partition gradients from local products and one
   all-reduce of ``R² + R + 1`` float64s,
4. rewrites the rank's gradient partition (``averaged_gradients``) with the method's combination,
   before DeepSpeed computes its global norm, clips and runs the inner step.

Where each stage keeps a micro-step's gradient, and how it is captured:

``ZeRO-1``
    Gradients are reduced only at the accumulation boundary, inside the last ``engine.backward``;
    before that each rank holds its local ``p.grad``. A gradient hook on every model parameter adds
    the **local** gradient to a per-task buffer of the full model ``[R, P]`` (like DDP); at the step
    one all-reduce of the used rows (divided by the world size, as DeepSpeed averages) gives the
    global per-task gradients, of which the rank keeps its partition. Ranks may run different tasks
    at the same micro-step.
``ZeRO-2`` and ``ZeRO-3``
    Every ``engine.backward`` reduces the gradients and accumulates the rank's partition
    (ZeRO-2: ``all_grad_tensors``, flattened into ``averaged_gradients`` at the boundary; ZeRO-3:
    one flat buffer, listed per sub-group in ``averaged_gradients`` after every backward). Each
    ``opt.task()`` block snapshots the partition on entry and adds the difference on exit to a
    buffer of the **partition only** (``[R, P/world]``). A reduced micro-step mixes the ranks, so
    **every rank must run the same task at the same micro-step** (checked at the step; a mismatch
    raises :class:`~balancedmix.distributed.DistributedStateError` on every rank before any
    parameter changes).

Refused with :class:`~balancedmix.distributed.UnsupportedDistributedError` at :func:`attach`
(before step 1): CPU/NVMe offload, fp16 loss scaling, fp32 gradient accumulation of bf16
gradients under ZeRO-1/2 (DeepSpeed's compact partition buffer), parameter padding, ZenFlow,
``nonfinite="skip_step"``.
DeepSpeed's ``gradient_clipping`` clips the *corrected* gradient (it runs after the hook).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..buffers import FlatBuffers
from . import (
    _FP64,
    DistributedStateError,
    SyncResult,
    UnsupportedDistributedError,
    _Collective,
    _ShardedStats,
    values_agree,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import BalancedOptimizer

__all__ = ["DeepSpeedSync", "DeepSpeedPending", "attach", "SUPPORTED_STAGES"]

logger = logging.getLogger(__name__)

SUPPORTED_STAGES = (1, 2, 3)
_DISCARD = -1


def _stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def _unsupported(engine: Any, zopt: Any, stage: int) -> list[str]:
    """Every reason this engine cannot be balanced (empty: supported)."""
    reasons = []
    if stage not in SUPPORTED_STAGES:
        reasons.append(f"ZeRO stage {stage} (supported: ZeRO-0 as DDP, ZeRO-1, ZeRO-2, ZeRO-3)")
        return reasons
    if getattr(zopt, "cpu_offload", False) or engine.zero_cpu_offload():
        reasons.append("ZeRO offload (offload_optimizer to cpu/nvme)")
    if engine.fp16_enabled():
        reasons.append("fp16 with loss scaling (use bf16 or fp32)")
    if stage == 3:
        if getattr(zopt, "offload_optimizer", False) or getattr(zopt, "offload_param", False):
            reasons.append("ZeRO offload (offload_optimizer / offload_param)")
        if getattr(zopt, "zenflow", False):
            reasons.append("ZenFlow")
        return reasons
    groups = range(len(zopt.bit16_groups))
    if any(zopt._use_compact_grad_partition_buffer(i) for i in groups):
        reasons.append("fp32 gradient accumulation of low-precision gradients (data_types.grad_accum_dtype; DeepSpeed's compact partition buffer)")
    if any(any(pad) for pad in getattr(zopt, "round_robin_bit16_padding", [[]])):
        reasons.append("parameter padding inside the flat groups")
    if getattr(zopt, "zenflow", False):
        reasons.append("ZenFlow")
    return reasons


class DeepSpeedPending(_Collective):
    """A wrapper built for DeepSpeed, not yet bound to its engine: every capture or step raises.

    :func:`~balancedmix.distributed.detect` returns it when the wrapper is built for DeepSpeed
    (accelerate's ``ACCELERATE_USE_DEEPSPEED``, ZeRO-3 parameters, a DeepSpeed inner optimizer).
    The same error is raised on every rank (the configuration is the same everywhere).
    """

    kind = "deepspeed-pending"
    uses_hooks = False

    def __init__(self, rank: int, world_size: int, reason: str) -> None:
        super().__init__(rank, world_size)
        self.reason = reason

    def _refuse(self) -> UnsupportedDistributedError:
        return UnsupportedDistributedError(
            f"this BalancedOptimizer runs under DeepSpeed ({self.reason}) but is not attached to the engine: call "
            "balancedmix.distributed.deepspeed.attach(engine) after deepspeed.initialize(optimizer=opt) / "
            "accelerator.prepare(model, opt), before the first backward. Nothing was changed."
        )

    def setup(self, buffers: FlatBuffers, num_tasks: int, declared: bool, estimator: str) -> None:
        if self.world_size > 1:
            super().setup(buffers, num_tasks, declared, estimator)

    def enter_task(self, params: Sequence[torch.Tensor]) -> None:
        raise self._refuse()

    def synchronize(self, *args: Any, **kwargs: Any) -> SyncResult:
        raise self._refuse()


class DeepSpeedSync(_ShardedStats):
    """ZeRO-1/2/3: per-task buffers of the rank's gradient partition; balancing as a pre-step hook on ZeRO's ``step()``.

    Built by :func:`attach`; see the module docstring for what each stage captures.
    """

    kind = "deepspeed"
    uses_hooks = False
    #: the engine runs the inner optimizer step itself; BalancedOptimizer.step() only forwards to it
    engine_driven = True

    def __init__(self, engine: Any, stage: int) -> None:
        import torch.distributed as dist

        zopt = engine.optimizer
        group = zopt.dp_process_group
        super().__init__(dist.get_rank(group=group), dist.get_world_size(group=group), group)
        self.engine = engine
        self.zopt = zopt
        self.stage = stage
        flats = zopt.fp32_partitioned_groups_flat if stage == 3 else zopt.single_partition_of_fp32_groups
        self.partitions: list[torch.Tensor] = list(flats)
        self._opt: BalancedOptimizer | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._open_row: int | None = None
        self._schedule_hash = 0
        self._schedule_len = 0
        self._grad_hooks: list[Any] = []
        self._local: FlatBuffers | None = None  # ZeRO-1: local gradients of the full model
        self._model_params: list[torch.Tensor] = []
        self._orig_step: Any = None

    # ------------------------------------------------------------------ binding
    def bind(self, optimizer: BalancedOptimizer) -> None:
        """Install the pre-step hook on ZeRO's ``step()`` (and, ZeRO-1, the local-gradient hooks)."""
        self._opt = optimizer
        zopt = self.zopt
        if self._orig_step is None:
            self._orig_step = zopt.step

            def step(*args: Any, **kwargs: Any) -> Any:
                self.pre_step()
                return self._orig_step(*args, **kwargs)

            zopt.step = step  # instance attribute: engine.step() -> zopt.step() runs the hook first
        if self.stage == 1:
            self._model_params = [p for g in zopt.bit16_groups for p in g if p.requires_grad]
            self._local = FlatBuffers(self._model_params, dtype=torch.float32)
            self._local.reserve(self._keys)
            for index, p in enumerate(self._model_params):
                self._grad_hooks.append(p.register_hook(self._make_hook(index)))

    def _make_hook(self, index: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            opt = self._opt
            assert opt is not None and self._local is not None
            row = opt._active_row
            if row is None:
                row = self._local.index(("untagged",))
            elif row == _DISCARD:
                return
            self._local.add(row, index, grad)

        return hook

    # ------------------------------------------------------------------ partition access
    def _current_partition(self, i: int) -> torch.Tensor:
        """A copy of the rank's accumulated (reduced, averaged) gradient partition of group ``i`` (flat)."""
        zopt = self.zopt
        part = self.partitions[i]
        size = part.numel()
        avg = zopt.averaged_gradients.get(i) if isinstance(zopt.averaged_gradients, dict) else None
        if self.stage == 3:
            # ZeRO-3 accumulates every micro-step into one flat buffer; averaged_gradients[i] lists the
            # sub-group's per-parameter views of it after every backward (None before the first one)
            if avg is None:
                return torch.zeros(size, dtype=part.dtype, device=part.device)
            return torch.cat([t.reshape(-1) for t in avg]).to(part.dtype)
        if avg is not None:  # ZeRO-1/2 at the boundary: the flat partition, as a list of pieces
            flat = torch.cat([t.reshape(-1) for t in avg]).to(part.dtype)
        else:
            acc = zopt.all_grad_tensors.get(i) if isinstance(zopt.all_grad_tensors, dict) else None
            if acc is None:  # no backward yet in this accumulation window
                return torch.zeros(size, dtype=part.dtype, device=part.device)
            flat = zopt.get_flat_partition(
                zopt.params_in_partition[i], zopt.first_offset[i], size, dtype=part.dtype,
                device=part.device, param_group_idx=i,
            ).clone()  # DeepSpeed's flatten of a single piece is a view of the live accumulator
        if flat.numel() < size:
            flat = torch.cat([flat, flat.new_zeros(size - flat.numel())])
        return flat

    def _write_partition(self, i: int, flat: torch.Tensor) -> None:
        """Write ``flat`` back into the pieces DeepSpeed's ``step()`` flattens (``averaged_gradients[i]``)."""
        avg = self.zopt.averaged_gradients.get(i)
        if avg is None:
            return
        offset = 0
        for t in avg:
            n = t.numel()
            if not getattr(t, "_zero_padding", False):
                t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    # ------------------------------------------------------------------ task blocks
    def half(self, count: int) -> int:
        # ZeRO-2: identical schedule on every rank; ZeRO-1: local capture, alternate across ranks like DDP
        return count % 2 if self.stage >= 2 else (count + self.rank) % 2

    def enter_task(self, params: Sequence[torch.Tensor]) -> None:
        assert self._opt is not None, "DeepSpeedSync used before attach()"
        row = self._opt._active_row
        self._open_row = row
        code = (row + 2) if row is not None and row != _DISCARD else 1
        self._schedule_hash = (self._schedule_hash * 131 + code) % 1_000_003
        self._schedule_len += 1
        if self.stage >= 2:
            self._snapshot = [self._current_partition(i) for i in range(len(self.partitions))]

    def _capture(self, buffers: FlatBuffers) -> None:
        snap, row = self._snapshot, self._open_row
        self._snapshot = None
        self._open_row = None
        if snap is None or row is None or row == _DISCARD:
            return
        for i in range(len(self.partitions)):
            buffers.add(row, i, self._current_partition(i) - snap[i])

    def exit_task(self, params: Sequence[torch.Tensor], buffers: FlatBuffers, row: int | None) -> None:
        self._capture(buffers)  # a no-op when the pre-step hook already captured this block

    def check_microbatch(self, present: Sequence[int], num_tasks: int) -> None:
        """Collective check before a micro-batch's backward (trainer path): every rank calls it.

        Every micro-batch must hold one task (a mixed one would need several backwards per
        micro-step, and each ``accelerator.backward`` steps the engine at the boundary); under
        ZeRO-2/3 all ranks must hold the same task. One all-reduce of ``K + 1`` float64s; a
        violation raises the same error on every rank, before any backward of this micro-step.
        """
        vec = torch.zeros(num_tasks + 1, dtype=_FP64)
        if len(present) == 1:
            vec[1 + int(present[0])] = 1.0
        else:
            vec[0] = 1.0
        device = self.partitions[0].device if self.partitions else torch.device("cpu")
        vec = self._all_reduce_small(vec, device)
        if float(vec[0]) > 0:
            raise UnsupportedDistributedError(
                f"a micro-batch mixes tasks on {int(vec[0])} rank(s): under DeepSpeed every micro-batch must hold one "
                "task (make per_device_train_batch_size a multiple of num_generations, or use a mixture schedule "
                "with whole single-task micro-batches). Parameters were not updated."
            )
        if self.stage >= 2 and int((vec[1:] > 0).sum()) > 1:
            raise DistributedStateError(
                f"under DeepSpeed ZeRO-{self.stage} every rank must train the same task at the same micro-step (ZeRO "
                "reduces every micro-step); the ranks' micro-batches hold different tasks. Use ZeRO-1, or a sampler "
                "that gives every rank the same task per micro-step. Parameters were not updated."
            )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def pre_step(self) -> None:
        """Run balancedmix on the rank's gradient partitions, then let ZeRO step (called by ZeRO's ``step()``)."""
        opt = self._opt
        assert opt is not None
        if opt._in_context:
            self._capture(opt.buffers)  # accelerate: engine.step() inside accelerator.backward, inside opt.task()
        grads = [self._current_partition(i) for i in range(len(self.partitions))]
        for p, g in zip(self.partitions, grads):
            p.grad = g
        try:
            opt._balance_for_engine()
            for i, p in enumerate(self.partitions):
                if p.grad is not None:
                    self._write_partition(i, p.grad)
        finally:
            for p in self.partitions:
                p.grad = None

    def synchronize(
        self,
        params: Sequence[torch.Tensor],
        buffers: FlatBuffers,
        rows: list[int],
        task_counts: dict[int, int],
        row_counts: dict[int, int],
        mismatch_tol: float,
    ) -> SyncResult:
        try:
            return self._synchronize(buffers, rows, row_counts)
        finally:
            self._schedule_hash = 0
            self._schedule_len = 0
            if self._local is not None:
                self._local.reset()

    def _synchronize(self, buffers: FlatBuffers, rows: list[int], row_counts: dict[int, int]) -> SyncResult:
        world = self.world_size
        local = self._local
        if local is not None:  # ZeRO-1: the rows live in the local full-model buffer
            rows = local.finish()
        header = self._meta_header(buffers, rows, row_counts)
        sched = torch.tensor(
            [float(self._schedule_hash), float(self._schedule_hash) ** 2, float(self._schedule_len), float(self._schedule_len) ** 2],
            dtype=_FP64,
        )
        mem = torch.zeros(world, dtype=_FP64)
        mem[self.rank] = float(buffers.nbytes + (local.nbytes if local is not None else 0))
        meta = torch.cat(header + [sched, mem])
        meta = self._all_reduce_small(meta, buffers.device)
        self._raise_collective_errors(float(meta[0]))
        n_rows = len(self._keys)
        used_g = meta[1 : 1 + n_rows]
        counts_g = meta[1 + n_rows : 1 + 2 * n_rows]
        o = 1 + 2 * n_rows
        h, h2, ln, ln2 = (float(x) for x in meta[o : o + 4])
        if self.stage >= 2 and not (values_agree(h, h2, world) and values_agree(ln, ln2, world)):
            raise DistributedStateError(
                f"under DeepSpeed ZeRO-{self.stage} every rank must run the same task blocks in the same order (ZeRO "
                "reduces the gradients after every micro-step, so a micro-step is attributable only if all ranks ran "
                "the same task); the ranks' task schedules differ this step. Use a sampler with a shared task "
                "schedule (MixtureSampler). Parameters were not updated."
            )
        mem_g = meta[o + 4 : o + 4 + world]
        grows, gtask_counts, grow_counts = self._unpack_counts(used_g, counts_g)
        comm = meta.numel() * meta.element_size()
        # rows used on another rank only (ZeRO-2: an empty local partition slice) must be zeros here
        buffers.zero_unused()
        if local is not None:
            local.zero_unused()
            data = local.data
            span = data[grows[0] : grows[-1] + 1] if grows else data[:0]
            if span.numel():
                self._all_reduce(span)
                span.div_(world)  # DeepSpeed averages over the data-parallel ranks
            comm += span.numel() * span.element_size()
            local.mark_complete(grows)  # reduced rows hold data on every rank: zeroed next step if unused
            self._extract_partitions(local, buffers, grows)
        buffers.mark_complete(grows)
        self.last_mode = f"zero{self.stage}"
        return SyncResult(grows, gtask_counts, grow_counts, comm, self.last_mode, {"buffer_bytes_max": float(mem_g.max())})

    def _extract_partitions(self, local: FlatBuffers, buffers: FlatBuffers, rows: list[int]) -> None:
        """Copy this rank's partition columns of the reduced full-model rows into the partition buffers."""
        zopt = self.zopt
        index = {id(p): k for k, p in enumerate(self._model_params)}
        pid = self.rank
        for r in rows:
            buffers.data[r].zero_()
        for i, group in enumerate(zopt.params_in_partition):
            base = buffers.offsets[i]
            size = int(zopt.partition_size[i])
            for param in group:
                k = index.get(id(param))
                if k is None:
                    continue
                param_id = zopt.get_param_id(param)
                src = int(zopt.grad_start_offset[i][pid][param_id])
                dst = int(zopt.grad_partition_insertion_offset[i][pid][param_id])
                n = int(min(param.numel() - src, size - dst))
                if n <= 0:
                    continue
                lo = local.offsets[k] + src
                for r in rows:
                    buffers.data[r, base + dst : base + dst + n] = local.data[r, lo : lo + n]


def attach(engine: Any, optimizer: BalancedOptimizer | None = None) -> BalancedOptimizer:
    """Bind the :class:`~balancedmix.optimizer.BalancedOptimizer` inside a DeepSpeed engine to the engine.

    Call once, after ``deepspeed.initialize(..., optimizer=BalancedOptimizer(...))`` (or
    ``accelerator.prepare``) and before the first backward. ZeRO-0 needs nothing (it is plain data
    parallel: the wrapper works as under DDP); ZeRO-1, ZeRO-2 and ZeRO-3 re-bind the wrapper to the rank's
    gradient partitions and hook ZeRO's ``step()`` (see the module docstring).

    Args:
        engine: the ``DeepSpeedEngine`` returned by ``deepspeed.initialize`` (accelerate: the
            prepared model).
        optimizer: the ``BalancedOptimizer`` handed to DeepSpeed; found inside the engine if omitted.

    Returns:
        The wrapper (use its ``task()`` blocks and ``diagnostics()``).

    Raises:
        TypeError: the engine's optimizer is not a ``BalancedOptimizer``.
        UnsupportedDistributedError: a configuration balancedmix cannot balance exactly (named in
            the message): offload, fp16 loss scaling, fp32 accumulation of bf16 gradients,
            ``nonfinite="skip_step"``.
    """
    from ..optimizer import BalancedOptimizer

    zopt = engine.optimizer
    stage = _stage(engine)
    inner = getattr(zopt, "optimizer", None) if stage > 0 else zopt
    found = inner if isinstance(inner, BalancedOptimizer) else None
    if found is None and isinstance(zopt, BalancedOptimizer):
        found = zopt
    if optimizer is not None and found is not None and optimizer is not found:
        raise ValueError("the BalancedOptimizer given is not the one inside the DeepSpeed engine")
    opt = optimizer if optimizer is not None else found
    if opt is None or found is None:
        raise TypeError(
            f"the DeepSpeed engine's optimizer is {type(inner).__name__}, not a BalancedOptimizer: hand "
            "BalancedOptimizer(torch.optim.AdamW(...), tasks=[...]) to deepspeed.initialize(optimizer=...) "
            "(with \"zero_allow_untested_optimizer\": true in the config)"
        )
    if isinstance(opt.distributed, DeepSpeedSync):
        return opt  # already attached
    if stage == 0:
        if isinstance(opt.distributed, DeepSpeedPending):  # plain data parallel: the DDP strategy applies
            from . import DDPSync, SingleProcess

            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            opt._rebind(DDPSync(dist.get_rank(), world, "auto") if world > 1 else SingleProcess())
        return opt
    reasons = _unsupported(engine, zopt, stage)
    if opt.nonfinite == "skip_step":
        reasons.append("nonfinite='skip_step' (DeepSpeed runs the step itself; use 'error' or 'skip_task')")
    if reasons:
        raise UnsupportedDistributedError(
            "balancedmix cannot balance this DeepSpeed configuration: " + "; ".join(reasons) + ". Nothing was changed."
        )
    strategy = DeepSpeedSync(engine, stage)
    opt._rebind(strategy, strategy.partitions)
    strategy.bind(opt)
    logger.info("balancedmix: attached to DeepSpeed ZeRO-%d (rank %d of %d)", stage, strategy.rank, strategy.world_size)
    return opt

