"""Everything in balancedmix that talks to ``torch.distributed``.

:class:`~balancedmix.optimizer.BalancedOptimizer` picks one of three strategies when it is built
(:func:`detect`):

``single`` (:class:`SingleProcess`)
    No process group, or a world of one process: no collective at all.

``ddp`` (:class:`DDPSync`)
    Data parallel with replicated parameters (``DistributedDataParallel``, accelerate's
    ``MULTI_CPU``/``MULTI_GPU``). The optimizer's gradient hooks run before DDP's reducer, so the
    task buffers hold this rank's *local* gradients. At the step every rank runs exactly two
    collectives, whatever tasks it saw:

    1. a small float64 all-reduce of fixed length (error flags, per-row used flags and
       micro-batch counts, per-parameter "has a gradient" flags, a fingerprint of ``p.grad`` per
       rank, a per-rank flag "``p.grad`` is my local total", two flags of the overlap hook);
    2. one in-place all-reduce of the float32 task buffer ``[R, P]`` (``R`` = every declared task,
       ×2 with the split estimator, + one row for untagged gradients, in registry order; rows a
       rank did not use are zeros), restricted to the span of rows used on *any* rank — a shape
       every rank reads from the reduced meta vector, so it is the same everywhere (usually the K
       task rows: the untagged row and absent tasks at the ends cost nothing); then a division by
       the world size, matching DDP's mean.

    ``p.grad`` is then either already DDP's mean of the local totals (``sync="ddp"``: DDP synced
    the last micro-step, as accelerate's ``accumulate()`` does) or only this rank's local total
    (``sync="buffers"``: every micro-step ran under ``no_sync``); ``sync="auto"`` tells the two
    apart from the fingerprints (identical ``p.grad`` on every rank means DDP synced it). In the
    ``buffers`` case the global total is written into ``p.grad`` from the reduced buffers.

    Opt-in, :func:`balancedmix.distributed.ddp_overlap.attach` registers a DDP communication hook
    that reduces the task rows' columns of each gradient bucket *instead of* ``p.grad``, inside
    DDP's synced backward (overlapped, ``T·P`` floats instead of ``(T + 1)·P``); the step then runs
    collective 1 only (see ``distributed/ddp_overlap.py``).

``fsdp2`` (:class:`FSDP2Sync`)
    ``torch.distributed.fsdp.fully_shard``: parameters and gradients are ``DTensor`` shards, and
    gradients reach ``p.grad`` through FSDP's reduce-scatter, not through autograd hooks on the
    sharded parameters. Every ``opt.task()`` block snapshots the local gradient shards on entry
    and adds the difference on exit (FSDP must sync every micro-step, and every rank must run the
    same task at the same micro-step, since the reduce-scatter mixes the ranks). The Gram matrix,
    the dot products with ``p.grad`` and ``||p.grad||²`` are sums of local shard products: one
    float64 all-reduce of ``R² + R + …`` scalars. The combination is applied locally. No full
    gradient is ever gathered.

``deepspeed`` (:class:`~balancedmix.distributed.deepspeed.DeepSpeedSync`)
    DeepSpeed ZeRO-1/2/3, bound by :func:`balancedmix.distributed.deepspeed.attach` after
    ``deepspeed.initialize`` / ``accelerator.prepare``; before that (accelerate's
    ``ACCELERATE_USE_DEEPSPEED``, ZeRO-3 parameters) :func:`detect` returns a pending strategy
    that refuses to capture or step until attached. See ``distributed/deepspeed.py``.

Rules every collective here follows: its number, order, dtype and shape depend only on static
configuration (declared tasks, estimator, parameters, world size) or on numbers already agreed
by an earlier collective, never on one rank's data; and every
error that depends on one rank's data is first agreed with an all-reduce, then raised on every
rank with the same message, so a faulty rank never leaves the others waiting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..tasks import TaskError, UnknownTaskError

if TYPE_CHECKING:  # pragma: no cover
    from ..buffers import FlatBuffers

__all__ = [
    "UnsupportedDistributedError",
    "DistributedStateError",
    "SyncStrategy",
    "SingleProcess",
    "DDPSync",
    "FSDP2Sync",
    "detect",
    "canonical_row_keys",
    "values_agree",
    "SYNC_MODES",
]

logger = logging.getLogger(__name__)

UNTAGGED_KEY = ("untagged",)
SYNC_MODES = ("auto", "ddp", "buffers")
_FP64 = torch.float64


class UnsupportedDistributedError(RuntimeError):
    """A distributed setup balancedmix does not handle (DeepSpeed ZeRO, tensor parallel DTensors)."""


class DistributedStateError(RuntimeError):
    """Ranks disagree about something that must be identical (task schedule under FSDP2, ``p.grad`` state).

    Raised on every rank with the same message.
    """


def _dist_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _deepspeed_reason(params: Sequence[torch.Tensor], optimizer: Any) -> str | None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes"):
        return "ACCELERATE_USE_DEEPSPEED is set (accelerate will hand the optimizer to DeepSpeed)"
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params):
        return "parameters carry DeepSpeed ZeRO-3 attributes (ds_id)"
    if type(optimizer).__module__.split(".")[0] == "deepspeed":
        return f"the optimizer is a DeepSpeed optimizer ({type(optimizer).__name__})"
    return None


def values_agree(total: float, total_sq: float, world_size: int) -> bool:
    """Whether ``world_size`` non-negative integers ``x_r`` were all equal, from ``Σ x_r`` and ``Σ x_r²``.

    ``world · Σ x² − (Σ x)² = world² · Var(x)`` is 0 exactly when all are equal (and ≥ world
    otherwise, for integers). The two sums come from one float64 SUM all-reduce, exact while
    ``world · max(x)² < 2**53`` (values < 2**20 — the schedule hash is taken mod 1,000,003 — and
    fewer than 8192 ranks); the products are then formed in Python integers, where they are exact
    too (in float64 ``(Σ x)²`` is not, and equal-but-large values could look different or worse,
    different values equal).
    """
    t, t2 = int(round(total)), int(round(total_sq))
    return world_size * t2 - t * t == 0


def canonical_row_keys(num_tasks: int, estimator: str) -> list[tuple]:
    """Buffer row keys in the fixed order every rank uses: each task (×2 halves with ``split``), then untagged."""
    halves = (0, 1) if estimator == "split" else (0,)
    return [("task", t, h) for t in range(num_tasks) for h in halves] + [UNTAGGED_KEY]


def detect(params: Sequence[torch.Tensor], optimizer: Any, sync: str = "auto") -> SyncStrategy:
    """Pick the strategy for ``params`` in the current process group.

    Raises:
        UnsupportedDistributedError: DeepSpeed, or DTensor parameters that are not FSDP2 ``Shard(0)``
            shards (tensor parallel), or a mix of DTensor and plain parameters.
        ValueError: an unknown ``sync`` mode.
    """
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
    reason = _deepspeed_reason(params, optimizer)
    if reason is not None:
        # the wrapper is about to be handed to DeepSpeed (accelerate / the HF Trainer): it works once
        # balancedmix.distributed.deepspeed.attach(engine) has bound it to the engine's partitions
        from .deepspeed import DeepSpeedPending

        rank, world = _dist_world()
        return DeepSpeedPending(rank, world, reason)
    dts = [_is_dtensor(p) for p in params]
    rank, world = _dist_world()
    if any(dts):
        if not all(dts):
            raise UnsupportedDistributedError(
                "some parameters are DTensors and some are plain tensors; shard the whole model with fully_shard "
                "(or pass only the sharded parameters to the optimizer)"
            )
        from torch.distributed.tensor import Shard

        for i, p in enumerate(params):
            placements = tuple(p.placements)  # type: ignore[attr-defined]
            if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in placements):  # type: ignore[attr-defined]
                raise UnsupportedDistributedError(
                    f"parameter {i} is a DTensor with placements {placements} on a {p.device_mesh.ndim}-d mesh; "  # type: ignore[attr-defined]
                    "balancedmix supports FSDP2 sharding (Shard on a 1-d mesh) only, not tensor parallelism or HSDP"
                )
        return FSDP2Sync(rank, world, params[0].device_mesh.get_group())  # type: ignore[attr-defined]
    if world > 1:
        return DDPSync(rank, world, sync)
    return SingleProcess()


@dataclass
class SyncResult:
    """What :meth:`SyncStrategy.synchronize` hands back to the optimizer."""

    rows: list[int]
    """Buffer rows used by any rank this step, sorted."""
    task_counts: dict[int, int]
    """Micro-batches per task index, summed over ranks."""
    row_counts: dict[int, int]
    """Micro-batches per buffer row (split-estimator halves), summed over ranks."""
    comm_bytes: int = 0
    """Bytes this rank handed to balancedmix's collectives this step (payload, not wire bytes)."""
    mode: str = "single"
    extra: dict[str, float] = field(default_factory=dict)


class SyncStrategy:
    """Interface: how the optimizer captures, reduces and writes gradients in one setting."""

    kind = "single"
    rank = 0
    world_size = 1
    #: the optimizer registers autograd hooks on the parameters (False: FSDP2 p.grad diffs)
    uses_hooks = True
    #: task-label errors are deferred to step() and raised collectively
    defers_task_errors = False
    #: bytes of the last partial-dot-product all-reduce (FSDP2)
    stats_bytes = 0
    #: how the last step was synchronised: "single", "ddp", "buffers", "fsdp2", "zero1", "zero2"
    last_mode = "single"
    #: the engine runs the inner optimizer step itself, after a pre-step hook that calls
    #: ``BalancedOptimizer._balance_for_engine()`` (DeepSpeed ZeRO-1/2); ``step()`` then only forwards
    engine_driven = False

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The rank-local plain tensor behind a parameter or gradient (identity outside FSDP2)."""
        return t

    def setup(self, buffers: FlatBuffers, num_tasks: int, declared: bool, estimator: str) -> None:
        """Called once the buffers exist (fixes the row layout where needed)."""

    def half(self, count: int) -> int:
        """Split-estimator half for this rank's ``count``-th micro-batch of a task."""
        return count % 2

    def record_error(self, exc: Exception) -> None:  # pragma: no cover - only for deferring strategies
        raise exc

    def reduce_stats(self, row_gram: torch.Tensor, grad_dots: torch.Tensor, grad_sq: torch.Tensor) -> None:
        """Turn rank-local partial dot products into global ones, in place (FSDP2 only)."""

    #: ``None``, or an in-place sum over ranks of a tensor built from local shards (FSDP2): the
    #: sketch storage sums its shards' sketches with it before taking their Gram
    reduce_partial = None

    def enter_task(self, params: Sequence[torch.Tensor]) -> None:
        """Called on entering an ``opt.task()`` block."""

    def exit_task(self, params: Sequence[torch.Tensor], buffers: FlatBuffers, row: int | None) -> None:
        """Called on leaving an ``opt.task()`` block (``row`` None: discard)."""

    def synchronize(
        self,
        params: Sequence[torch.Tensor],
        buffers: FlatBuffers,
        rows: list[int],
        task_counts: dict[int, int],
        row_counts: dict[int, int],
        mismatch_tol: float,
    ) -> SyncResult:
        """Agree on the step across ranks; afterwards the buffers hold the global per-task gradients."""
        return SyncResult(rows, dict(task_counts), dict(row_counts), 0, self.kind)


class SingleProcess(SyncStrategy):
    """One process: nothing to communicate."""


class _Collective(SyncStrategy):
    """Shared machinery of the multi-process strategies: deferred errors, fixed layout, meta vector."""

    defers_task_errors = True

    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self._errors: list[tuple[str, str]] = []  # (exception class name, message) on this rank
        self._keys: list[tuple] = []

    def setup(self, buffers: FlatBuffers, num_tasks: int, declared: bool, estimator: str) -> None:
        if not declared:
            raise TaskError(
                f"a distributed run ({self.kind}, {self.world_size} processes) needs the task list declared up "
                "front, identical on every rank: BalancedOptimizer(..., tasks=['math', 'code', ...])"
            )
        if buffers.keys:
            raise RuntimeError("the task buffers were allocated before the distributed layout was fixed")
        buffers.reserve(canonical_row_keys(num_tasks, estimator))
        # every row exists from here on (no allocation moves rows later), in an order that is a
        # function of the keys alone: the same layout on every rank
        self._keys = list(buffers.keys)

    def half(self, count: int) -> int:
        # alternate the halves across ranks too, so a task seen once on each of two ranks still
        # gets one micro-batch in each half
        return (count + self.rank) % 2

    def record_error(self, exc: Exception) -> None:
        self._errors.append((type(exc).__name__, str(exc)))
        logger.debug("rank %d: deferred %s until step(): %s", self.rank, type(exc).__name__, exc)

    def _all_reduce(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, group=self.group)

    def _all_reduce_small(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """All-reduce a small CPU tensor on ``device`` (NCCL reduces CUDA tensors only); returns it on the CPU."""
        if device.type == "cpu":
            self._all_reduce(t)
            return t
        on_device = t.to(device)
        self._all_reduce(on_device)
        return on_device.cpu()

    def _raise_collective_errors(self, n_errors: float) -> None:
        """All ranks call this with the same reduced count; if it is > 0 every rank raises the same error."""
        if n_errors <= 0:
            return
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, self._errors, group=self.group)
        self._errors = []
        lines = []
        kinds = []
        for r, errs in enumerate(gathered):
            for cls_name, msg in errs or []:
                lines.append(f"rank {r}: {msg}")
                kinds.append(cls_name)
        message = "task label error on " + ("1 rank" if len({ln.split(':')[0] for ln in lines}) == 1 else "several ranks") + \
            " (raised on every rank; the step was not taken): " + "; ".join(lines)
        if kinds and all(k == "UnknownTaskError" for k in kinds):
            raise UnknownTaskError(message)
        raise TaskError(message)

    def _meta_header(self, buffers: FlatBuffers, rows: list[int], row_counts: dict[int, int]) -> list[torch.Tensor]:
        n_rows = len(self._keys)
        used = torch.zeros(n_rows, dtype=_FP64)
        counts = torch.zeros(n_rows, dtype=_FP64)
        for r in rows:
            used[r] = 1.0
        for r, c in row_counts.items():
            counts[r] = float(c)
        return [torch.tensor([float(len(self._errors))], dtype=_FP64), used, counts]

    def _unpack_counts(self, used: torch.Tensor, counts: torch.Tensor) -> tuple[list[int], dict[int, int], dict[int, int]]:
        rows = [r for r in range(len(self._keys)) if used[r] > 0]
        row_counts = {r: int(round(float(counts[r]))) for r in range(len(self._keys)) if counts[r] > 0}
        task_counts: dict[int, int] = {}
        for r, c in row_counts.items():
            key = self._keys[r]
            if key[0] == "task":
                task_counts[key[1]] = task_counts.get(key[1], 0) + c
        return rows, task_counts, row_counts

    def clear(self) -> None:
        """Drop deferred errors (zero_grad between steps keeps them: they are raised at step())."""
        self._errors = []


def _sketch_not_local(buffers: Any, tol: float) -> bool:
    """Sketch storage, before any reduction: is ``p.grad`` *not* this rank's ``Σ_r c_r G_r``?

    Checked in sketch space, where it is exact up to rounding (``S`` is linear and the hooks put
    ``c_r · grad`` into ``p.grad`` for every gradient they sketch into row ``r``): ``S(p.grad)``
    against ``Σ_r c_r · row_r``, by the same cosine and scale test as exact rows. One pass over
    ``p.grad`` (its sketch); ``tol`` is the optimizer's ``mismatch_tol``.
    """
    gram, dots, sq = buffers.row_stats([p.grad for p in buffers.params])
    w = buffers.applied()
    lsq, dot, gsq = float(w @ gram @ w), float(w @ dots), float(sq)
    if lsq > 0 and gsq > 0:
        return 1.0 - dot * dot / (lsq * gsq) > tol or abs(dot / lsq - 1.0) > 1e-2
    return lsq > 0 or gsq > 0


class DDPSync(_Collective):
    """Replicated parameters (DDP): local task buffers, one fused all-reduce at the step.

    Args:
        sync: ``"ddp"`` — ``p.grad`` was synced by DDP (mean over ranks of the local totals);
            ``"buffers"`` — every micro-step ran under ``no_sync``, ``p.grad`` holds this rank's
            total and is rebuilt from the reduced buffers (sketch mode: ``p.grad`` itself is
            all-reduced, after a check in sketch space that it is this rank's total);
            ``"auto"`` — decided each step from a fingerprint of ``p.grad`` on every rank.
    """

    kind = "ddp"

    def __init__(self, rank: int, world_size: int, sync: str = "auto") -> None:
        super().__init__(rank, world_size)
        self.sync = sync
        #: the communication hook of :func:`balancedmix.distributed.ddp_overlap.attach`, if any
        self.overlap: Any = None

    def synchronize(
        self,
        params: Sequence[torch.Tensor],
        buffers: FlatBuffers,
        rows: list[int],
        task_counts: dict[int, int],
        row_counts: dict[int, int],
        mismatch_tol: float,
    ) -> SyncResult:
        world = self.world_size
        data = buffers.data
        # ---- did the overlap hook reduce the task rows inside DDP's backward? (DDP syncs on every
        # rank alike, so "ran" is the same everywhere unless something is broken; agreed below)
        ov_ran, ov_bad = self.overlap.state(buffers) if self.overlap is not None else (0.0, 0.0)
        overlap_flags = torch.tensor([ov_ran, ov_bad], dtype=_FP64)
        if ov_ran:
            return self._synchronize_overlapped(params, buffers, rows, row_counts, overlap_flags)
        # ---- local facts about p.grad
        has_grad = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], dtype=_FP64)
        fingerprint = torch.zeros(2 * world, dtype=_FP64)
        local_flag = torch.zeros(1, dtype=_FP64)  # 1: p.grad is NOT this rank's local total
        gsum, gsq, dot, lsq = (torch.zeros((), dtype=_FP64, device=data.device) for _ in range(4))
        # lagged storages (sketch, measure=) hold no gradients to rebuild p.grad from: in "buffers" mode
        # p.grad itself is all-reduced (sketch mode; its local check runs in sketch space), or refused
        exact_rows = getattr(buffers, "can_rebuild", True)
        sketched = hasattr(buffers, "sketch_grads")
        check_local = self.sync in ("auto", "buffers") and exact_rows
        buffers.zero_unused()  # rows this rank did not fill this step are zeros from here on
        local_total = data.sum(0) if (check_local and rows) else None  # one pass over [R, P]
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            g = p.grad.detach().reshape(-1).to(data.dtype)
            gsum += g.sum().to(_FP64)
            gsq += g.dot(g).to(_FP64)
            if local_total is not None:
                loc = local_total[buffers.slice(i)]
                dot += loc.dot(g).to(_FP64)
                lsq += loc.dot(loc).to(_FP64)
        if check_local:
            gsq_f, dot_f, lsq_f = float(gsq), float(dot), float(lsq)
            if lsq_f > 0 and gsq_f > 0:
                cos2 = dot_f * dot_f / (lsq_f * gsq_f)
                scale = dot_f / lsq_f
                if 1.0 - cos2 > mismatch_tol or abs(scale - 1.0) > 1e-2:
                    local_flag[0] = 1.0
            elif lsq_f > 0 or gsq_f > 0:
                local_flag[0] = 1.0
        if self.sync in ("auto", "buffers") and sketched and _sketch_not_local(buffers, mismatch_tol):
            local_flag[0] = 1.0
        fingerprint[2 * self.rank] = float(gsum)
        fingerprint[2 * self.rank + 1] = float(gsq)
        header = self._meta_header(buffers, rows, row_counts)
        meta = torch.cat(header + [has_grad, fingerprint, local_flag, overlap_flags])
        meta = self._all_reduce_small(meta, buffers.device)
        n_rows = len(self._keys)
        n_params = len(params)
        self._raise_collective_errors(float(meta[0]))
        self._check_overlap(meta[-2:])
        used_g = meta[1 : 1 + n_rows]
        counts_g = meta[1 + n_rows : 1 + 2 * n_rows]
        o = 1 + 2 * n_rows
        has_grad_g = meta[o : o + n_params] > 0
        o += n_params
        fps = meta[o : o + 2 * world].view(world, 2)
        any_not_local = float(meta[o + 2 * world]) > 0

        identical = bool(torch.allclose(fps, fps[:1].expand_as(fps), rtol=1e-9, atol=1e-30))
        if self.sync == "auto":
            mode = "ddp" if identical else "buffers"
        else:
            mode = self.sync
        if mode == "buffers" and not exact_rows and not sketched:
            raise DistributedStateError(
                "measure= needs DDP to all-reduce p.grad (the corrected update travels in it), but p.grad differs "
                "across ranks at step(): every micro-step ran under no_sync. Let the last micro-step of each step "
                "sync (accelerate's accumulate() does). Parameters were not updated."
            )
        if mode == "ddp" and not identical:
            raise DistributedStateError(
                "sync='ddp' but p.grad differs across ranks at step(): DDP did not all-reduce the gradients "
                "(every micro-step ran under no_sync?), or only partly: a mixed-task opt.backward({task: loss}) with DDP "
                "sync on reduces only its first backward (run it under no_sync). Use sync='buffers' or sync='auto'. "
                "Parameters were not updated."
            )
        if mode == "buffers" and any_not_local:
            raise DistributedStateError(
                "p.grad is not this rank's local sum of the captured gradients on at least one rank (sync='buffers' "
                f"mode{' detected' if self.sync == 'auto' else ''}): p.grad was changed before opt.synchronize() — "
                "clip gradients after calling opt.synchronize() (or let step() do it), never on the local gradients. "
                "Or a mixed-task opt.backward({task: loss}) ran while DDP synced gradients: DDP all-reduces only the "
                "first of several backwards over one forward, so run those micro-steps under no_sync "
                "(accelerator.no_sync(model)). Parameters were not updated."
            )

        # ---- the fused buffer all-reduce: rows lo..hi-1, the span of the rows used on any rank —
        # identical on every rank because it comes from the reduced meta vector; rows this rank
        # did not fill are zeros. A contiguous view of the [R, P] buffer: no copy.
        grows, gtask_counts, grow_counts = self._unpack_counts(used_g, counts_g)
        span = data[grows[0] : grows[-1] + 1] if grows else data[:0]
        if span.numel():
            self._all_reduce(span)
            span.div_(world)
        buffers.mark_complete(grows)

        grad_bytes = 0
        if mode == "buffers":
            # exact rows: p.grad is rebuilt from the reduced rows. Sketch mode: p.grad (each rank's
            # Σ_t c_t G_t, lagged coefficients applied by the hooks) is all-reduced as DDP would have
            # done, one parameter at a time (no P-sized staging buffer)
            total = None
            if exact_rows:
                total = span.sum(0) if span.numel() else torch.zeros(data.shape[1], dtype=data.dtype, device=data.device)
            for i, p in enumerate(params):
                if not bool(has_grad_g[i]):
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if total is not None:
                    p.grad.copy_(total[buffers.slice(i)].view_as(p.grad))
                    continue
                g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                self._all_reduce(g)
                g.div_(world)
                if g is not p.grad:
                    p.grad.copy_(g)
                grad_bytes += g.numel() * g.element_size()
        comm = meta.numel() * meta.element_size() + span.numel() * span.element_size() + grad_bytes
        self.last_mode = mode
        return SyncResult(grows, gtask_counts, grow_counts, comm, mode)

    def _check_overlap(self, flags: torch.Tensor) -> None:
        """Raise on every rank if the overlap hook ran on some ranks only, or ran wrongly on any."""
        ran, bad = float(flags[0]), float(flags[1])
        if bad > 0 or 0 < ran < self.world_size:
            raise DistributedStateError(
                "ddp_overlap: the task rows were not reduced exactly once after the last gradient of the step "
                f"({'a bucket was reduced twice or a gradient was captured after its bucket was reduced' if bad > 0 else 'the communication hook ran on some ranks only'}). "
                "DDP must synchronise exactly one micro-step per optimizer step, the last: run the others under "
                "model.no_sync() (accelerate: accumulate()), and run no backward after the synced one before step(). "
                "Parameters were not updated."
            )

    def _synchronize_overlapped(
        self,
        params: Sequence[torch.Tensor],
        buffers: FlatBuffers,
        rows: list[int],
        row_counts: dict[int, int],
        overlap_flags: torch.Tensor,
    ) -> SyncResult:
        """The rows were reduced by the DDP communication hook: only agree on counts and errors.

        The meta vector has the same length as the other path's (the fingerprints are left zero:
        ``p.grad`` is the hook's sum of the reduced rows on every rank), so a rank on this path
        and a rank on the other still run matching collectives, and both raise the disagreement.
        """
        n_params = len(params)
        header = self._meta_header(buffers, rows, row_counts)
        filler = torch.zeros(n_params + 2 * self.world_size + 1, dtype=_FP64)
        meta = torch.cat(header + [filler, overlap_flags])
        meta = self._all_reduce_small(meta, buffers.device)
        n_rows = len(self._keys)
        self._raise_collective_errors(float(meta[0]))
        self._check_overlap(meta[-2:])
        used_g = meta[1 : 1 + n_rows]
        counts_g = meta[1 + n_rows : 1 + 2 * n_rows]
        grows, gtask_counts, grow_counts = self._unpack_counts(used_g, counts_g)
        if self._keys[-1] == UNTAGGED_KEY and (n_rows - 1) in grows:
            raise DistributedStateError(
                "ddp_overlap: a gradient was captured outside any opt.task() block (untagged) on at least one rank; "
                "the overlapped reduction carries the task rows only. Run every backward inside opt.task(...) "
                "(or opt.backward({task: loss})). Parameters were not updated."
            )
        buffers.mark_complete(grows)
        buffers.zero_unused()  # e.g. an untagged row left from an earlier step (the hook zeroed the others)
        comm = meta.numel() * meta.element_size() + self.overlap.bytes
        self.overlap.clear()
        self.last_mode = "overlap"
        return SyncResult(grows, gtask_counts, grow_counts, comm, "overlap")


class _ShardedStats(_Collective):
    """An engine whose task rows hold this rank's shard: the Gram and the dots with ``p.grad`` are
    local products, summed over ranks in one small float64 all-reduce (FSDP2, DeepSpeed ZeRO)."""

    def reduce_stats(self, row_gram: torch.Tensor, grad_dots: torch.Tensor, grad_sq: torch.Tensor) -> None:
        n = row_gram.shape[0]
        packed = torch.cat([row_gram.reshape(-1).to(_FP64).cpu(), grad_dots.to(_FP64).cpu(), grad_sq.reshape(1).to(_FP64).cpu()])
        packed = self._all_reduce_small(packed, row_gram.device)
        row_gram.copy_(packed[: n * n].view(n, n))
        grad_dots.copy_(packed[n * n : n * n + n])
        grad_sq.copy_(packed[-1])
        self.stats_bytes = packed.numel() * packed.element_size()


class FSDP2Sync(_ShardedStats):
    """FSDP2 (``fully_shard``): per-task buffers of the local gradient shards, Gram by one all-reduce."""

    kind = "fsdp2"
    uses_hooks = False

    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        super().__init__(rank, world_size, group)
        self._snapshot: list[torch.Tensor | None] | None = None
        self._schedule_hash = 0
        self._schedule_len = 0
        # task blocks after which no parameter had a gradient, and blocks with gradients after such
        # a block: FSDP2's gradient sync was off (no_sync / accumulate()), the reduce-scatter was
        # deferred to a later block, which would receive the earlier blocks' gradients
        self._empty_blocks = 0
        self._late_blocks = 0

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if _is_dtensor(t) else t

    def half(self, count: int) -> int:
        return count % 2  # identical schedule on every rank: the same micro-batch, the same half

    def enter_task(self, params: Sequence[torch.Tensor]) -> None:
        self._snapshot = [None if p.grad is None else self.local(p.grad).detach().clone() for p in params]

    def reduce_partial(self, t: torch.Tensor) -> None:  # type: ignore[override]
        """Sum ``t`` (sketches of local shards) over the ranks, in place."""
        self._all_reduce(t)
        self.stats_bytes = t.numel() * t.element_size()

    def exit_task(self, params: Sequence[torch.Tensor], buffers: FlatBuffers, row: int | None) -> None:
        snap = self._snapshot
        self._snapshot = None
        # schedule fingerprint: a polynomial hash of the rows, identical across ranks when schedules match
        code = (row + 2) if row is not None else 1
        self._schedule_hash = (self._schedule_hash * 131 + code) % 1_000_003
        self._schedule_len += 1
        if row is None or snap is None:
            return
        any_grad = False
        # lagged coefficient of the row (sketch mode; 1 otherwise): FSDP2 runs no per-parameter
        # hook, so the block's increment is scaled here: p.grad = before + c · (p.grad − before)
        c = buffers.hook_scale(row) if hasattr(buffers, "hook_scale") else 1.0
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            any_grad = True
            cur = self.local(p.grad).detach()
            before = snap[i]
            buffers.add(row, i, cur if before is None else cur - before)
            if c != 1.0:
                cur.mul_(c)
                if before is not None:
                    cur.add_(before, alpha=1.0 - c)
        if not any_grad:
            self._empty_blocks += 1
        elif self._empty_blocks:
            self._late_blocks += 1

    def synchronize(
        self,
        params: Sequence[torch.Tensor],
        buffers: FlatBuffers,
        rows: list[int],
        task_counts: dict[int, int],
        row_counts: dict[int, int],
        mismatch_tol: float,
    ) -> SyncResult:
        world = self.world_size
        header = self._meta_header(buffers, rows, row_counts)
        sched = torch.tensor(
            [float(self._schedule_hash), float(self._schedule_hash) ** 2, float(self._schedule_len), float(self._schedule_len) ** 2],
            dtype=_FP64,
        )
        mem = torch.zeros(world, dtype=_FP64)
        mem[self.rank] = float(buffers.nbytes)
        deferred = torch.tensor([float(self._empty_blocks if self._late_blocks else 0)], dtype=_FP64)
        meta = torch.cat(header + [sched, mem, deferred])
        meta = self._all_reduce_small(meta, buffers.device)
        self._schedule_hash = 0
        self._schedule_len = 0
        self._empty_blocks = 0
        self._late_blocks = 0
        self._raise_collective_errors(float(meta[0]))
        n_rows = len(self._keys)
        used_g = meta[1 : 1 + n_rows]
        counts_g = meta[1 + n_rows : 1 + 2 * n_rows]
        o = 1 + 2 * n_rows
        h, h2, ln, ln2 = (float(x) for x in meta[o : o + 4])
        if not (values_agree(h, h2, world) and values_agree(ln, ln2, world)):
            raise DistributedStateError(
                "under FSDP2 every rank must run the same task blocks in the same order (the reduce-scatter after each "
                "micro-step averages the ranks, so a micro-step is attributable only if all ranks ran the same task); "
                "the ranks' task schedules differ this step. Use a sampler with a shared task schedule "
                "(MixtureSampler). Parameters were not updated."
            )
        mem_g = meta[o + 4 : o + 4 + world]
        if float(meta[o + 4 + world]) > 0:
            raise DistributedStateError(
                "under FSDP2 gradient synchronisation was off for some task blocks of this step: no parameter had a "
                "gradient after them, and a later block received the deferred reduce-scatter, i.e. the gradients of "
                "several tasks (accelerator.accumulate() or accelerator.no_sync() / set_requires_gradient_sync(False) "
                "on non-final micro-steps). balancedmix reads each task's gradient from p.grad after its block, so "
                "FSDP2 must sync every micro-step: Accelerator(gradient_accumulation_plugin=GradientAccumulationPlugin("
                "num_steps=..., sync_each_batch=True)), or no accumulate()/no_sync around the backwards. Parameters "
                "were not updated."
            )
        grows, gtask_counts, grow_counts = self._unpack_counts(used_g, counts_g)
        # rows used on another rank only (an empty local shard) must enter the local products as zeros
        buffers.zero_unused()
        buffers.mark_complete(grows)
        comm = meta.numel() * meta.element_size()
        self.last_mode = "fsdp2"
        return SyncResult(grows, gtask_counts, grow_counts, comm, "fsdp2", {"buffer_bytes_max": float(mem_g.max())})
