"""DDP with balancedmix's row reduction inside DDP's own bucketed all-reduce (opt-in).

Use::

    model = DDP(module)                                   # or accelerator.prepare(module)
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters()), tasks=["math", "code"])
    balancedmix.distributed.ddp_overlap.attach(model, opt)   # once, before the first backward
    for i, (task, batch) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (nullcontext() if last else model.no_sync()), opt.task(task):  # accelerate: accumulate()
            loss(model, batch).backward()
    opt.step(); opt.zero_grad()

Without it (``sync="ddp"``) a step all-reduces ``p.grad`` inside DDP's backward and then, after the
backward, balancedmix all-reduces the ``[K, P]`` task rows once more: ``(K + 1)·P`` floats, the
rows' part exposed after the backward. :func:`attach` registers a DDP communication hook
(``DistributedDataParallel.register_comm_hook``) that replaces DDP's all-reduce of each gradient
bucket by one all-reduce of the **task rows' columns of that bucket** (``[T, n_bucket]``, ``T`` =
every declared task row: ``K``, ``2K`` with ``estimator="split"``), launched by DDP as soon as the
bucket's gradients are ready in the synced backward, so it overlaps the rest of that backward like
DDP's own reduction. The bucket's gradient ``p.grad`` is then the sum of the reduced rows — what
DDP would have computed (the mean over ranks of the local totals), up to float rounding. The
rows are written back in place: after the backward they hold the global per-task gradients, and
``step()`` runs one small float64 all-reduce only (agreement, counts, errors). Bytes per step:
``T·P`` floats instead of ``(T + 1)·P`` (DDP's ``P`` + the rows).

Every collective still has a shape fixed by static configuration: DDP's buckets are the same on
every rank (DDP checks it), and ``T`` is the number of declared task rows, whatever tasks a rank
ran; ranks may run different task orders. The hook runs only in the backwards DDP synchronises,
so it needs exactly one synced micro-step per optimizer step, the last (``no_sync`` on the
others, as accelerate's ``accumulate()`` does). Checked at ``step()`` and raised on every rank as
:class:`~balancedmix.distributed.DistributedStateError` (parameters not updated):

- a gradient captured after its bucket was reduced (a micro-step after the synced one, a second
  backward in the synced block), or a bucket reduced twice in one step (DDP synced every
  micro-step);
- an untagged gradient (a backward outside any ``opt.task()`` block) on any rank: the untagged row
  is not in the reduction (it would cost ``P`` more floats every step).

A step in which DDP synced nothing (every micro-step under ``no_sync``) takes the usual path
(``sync="auto"``/``"buffers"``). Not with ``sketch_dim``, ``measure=`` or ``sync="buffers"``;
the optimizer's parameters must be exactly DDP's trainable parameters. One communication hook
per DDP module (a DDP rule): not together with accelerate's ``comm_hook`` kwargs handler.
Extra memory: the packed rows of a bucket while its reduction is in flight (at most ``T`` × the
bucket size per bucket in flight; DDP's default buckets are 25 MiB).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from . import DDPSync, UNTAGGED_KEY

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import BalancedOptimizer

__all__ = ["attach", "DDPOverlap"]


class DDPOverlap:
    """State of the communication hook for one wrapper: which buckets were reduced in this step.

    ``epoch`` is the buffers' step counter at the hook (``FlatBuffers.epoch``): state from a step
    that ``zero_grad()`` discarded is ignored. ``seen`` maps each reduced parameter to its capture
    count at the reduction; a later capture makes the step invalid.
    """

    def __init__(self, optimizer: BalancedOptimizer, process_group: Any) -> None:
        self._opt = weakref.ref(optimizer)
        self.group = process_group
        self.epoch = -1
        self.seen: dict[int, int] = {}
        self.buckets: dict[int, int] = {}  # bucket index -> hook calls this step
        self.bytes = 0
        self._index: dict[int, int] = {}
        self._index_for: list[torch.Tensor] | None = None

    # ---------------------------------------------------------------- per-step state
    def _start(self, epoch: int) -> None:
        if self.epoch != epoch:
            self.epoch = epoch
            self.seen = {}
            self.buckets = {}
            self.bytes = 0

    def state(self, buffers: Any) -> tuple[float, float]:
        """``(ran, bad)`` for this step: the hook reduced a bucket; a bucket was reduced twice or a
        gradient was captured after its bucket's reduction."""
        if self.epoch != buffers.epoch or not self.buckets:
            return 0.0, 0.0
        adds = buffers.param_adds
        bad = any(c > 1 for c in self.buckets.values()) or any(adds[i] != n for i, n in self.seen.items())
        return 1.0, 1.0 if bad else 0.0

    def clear(self) -> None:
        self.epoch = -1
        self.seen = {}
        self.buckets = {}
        self.bytes = 0

    # ---------------------------------------------------------------- the hook
    def __call__(self, bucket: Any) -> torch.futures.Future:
        import torch.distributed as dist

        opt = self._opt()
        if opt is None:  # the wrapper is gone: behave like DDP's default hook
            t = bucket.buffer()
            t.div_(dist.get_world_size(self.group))
            return dist.all_reduce(t, group=self.group, async_op=True).get_future().then(lambda f: f.value()[0])
        buffers = opt.buffers
        strategy = opt.distributed
        if opt._params is not self._index_for:  # parameters re-installed (a new list): rebuild the id -> index map
            self._index = {id(p): i for i, p in enumerate(opt._params)}
            self._index_for = opt._params
        self._start(buffers.epoch)
        strategy.overlap = self
        params = bucket.parameters()
        try:
            idx = [self._index[id(p)] for p in params]
        except KeyError:
            raise RuntimeError(
                "a DDP gradient bucket holds a parameter the BalancedOptimizer does not hook (the optimizer's "
                "parameters changed since ddp_overlap.attach()); re-run attach with the current optimizer"
            ) from None
        n_rows = len(buffers.keys) - 1  # every task row; the untagged row (last) is not reduced
        written = buffers._written
        views = buffers._views
        parts = []
        for r in range(n_rows):
            w = written[r]
            for i in idx:
                parts.append(views[r][i].reshape(-1) if w[i] else torch.zeros(buffers.numels[i], dtype=buffers.dtype, device=buffers.device))
        packed = torch.cat(parts) if parts else torch.zeros(0, dtype=buffers.dtype, device=buffers.device)
        # the rows' slices of these parameters now receive the global values (written in the callback)
        for r in range(n_rows):
            w = written[r]
            for i in idx:
                w[i] = True
        adds = buffers.param_adds
        for i in idx:
            self.seen[i] = adds[i]
        b = int(bucket.index())
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.bytes += packed.numel() * packed.element_size()
        world = dist.get_world_size(self.group)
        out_dtype = bucket.buffer().dtype
        numels = [buffers.numels[i] for i in idx]
        n = sum(numels)
        targets = [[views[r][i].view(-1) for i in idx] for r in range(n_rows)]

        def done(fut: torch.futures.Future) -> torch.Tensor:
            res = fut.value()[0]
            res.div_(world)
            rows = res.view(n_rows, n)
            for r in range(n_rows):
                torch._foreach_copy_(targets[r], list(rows[r].split(numels)))
            total = rows[0].clone() if n_rows else torch.zeros(n, dtype=res.dtype, device=res.device)
            for r in range(1, n_rows):  # row by row: several times faster than rows.sum(0) on CPU
                total.add_(rows[r])
            return total.to(out_dtype)

        return dist.all_reduce(packed, group=self.group, async_op=True).get_future().then(done)


def attach(model: Any, optimizer: BalancedOptimizer) -> DDPOverlap:
    """Reduce ``optimizer``'s task rows inside ``model``'s DDP all-reduce (see the module docstring).

    Call once, after wrapping the model in DDP and building the wrapper, before the first backward.

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel`` module (accelerate: the prepared model).
        optimizer: the :class:`~balancedmix.optimizer.BalancedOptimizer` over that model's parameters.

    Returns:
        The hook's state object.

    Raises:
        TypeError: ``model`` is not a DDP module, or ``optimizer`` is not a ``BalancedOptimizer``.
        ValueError: the wrapper is not under DDP, uses ``sync="buffers"``, ``sketch_dim`` or
            ``measure=``, or its parameters are not exactly the model's trainable parameters.
    """
    from torch.nn.parallel import DistributedDataParallel

    from ..optimizer import BalancedOptimizer

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"ddp_overlap.attach needs a DistributedDataParallel module, got {type(model).__name__}")
    if not isinstance(optimizer, BalancedOptimizer):
        raise TypeError(f"ddp_overlap.attach needs a BalancedOptimizer, got {type(optimizer).__name__}")
    strategy = optimizer.distributed
    if not isinstance(strategy, DDPSync):
        raise ValueError(f"ddp_overlap needs the wrapper under DDP (a multi-process run); it runs under {strategy.kind!r}")
    if strategy.sync == "buffers":
        raise ValueError(
            "sync='buffers' means every micro-step runs under no_sync, so DDP never calls the communication hook; "
            "use sync='ddp' or 'auto' with ddp_overlap (DDP syncs the last micro-step)"
        )
    buffers = optimizer.buffers
    if getattr(buffers, "kind", "exact") != "exact" or getattr(buffers, "lagged", False) or len(optimizer._measured) < len(optimizer._params):
        raise ValueError("ddp_overlap reduces exact task rows: not with sketch_dim or measure=")
    if not buffers.keys or buffers.keys[-1] != UNTAGGED_KEY:  # pragma: no cover - fixed by DDPSync.setup
        raise RuntimeError("unexpected task-row layout")
    ddp_params = {id(p) for p in model.module.parameters() if p.requires_grad}
    opt_params = {id(p) for p in optimizer._params}
    if ddp_params != opt_params:
        raise ValueError(
            "ddp_overlap needs the BalancedOptimizer's parameters to be exactly the DDP module's trainable parameters "
            f"({len(opt_params)} in the optimizer, {len(ddp_params)} trainable in the module, "
            f"{len(opt_params & ddp_params)} in both): every DDP bucket is rebuilt from the task rows"
        )
    hook = DDPOverlap(optimizer, model.process_group)
    strategy.overlap = hook
    model.register_comm_hook(hook, _comm_hook)
    return hook


def _comm_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP checks the annotations: none, or GradBucket/Future
    return state(bucket)
