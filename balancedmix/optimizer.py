"""``BalancedOptimizer``: per-task gradient attribution, diagnostics and corrections around any
``torch.optim`` optimizer.

Usage::

    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), method="normalize")
    for batch in micro_batches:               # any order of tasks, any number per step
        with opt.task(batch):                 # batch["task"] names the batch's task
            model(**batch).loss.backward()
    opt.step()                                # stats, correction, inner AdamW step
    opt.zero_grad()
    log(opt.diagnostics())                    # {"grad_norm/math": ..., "update_share/code": ...}

How it works: a gradient hook on every trainable parameter adds the parameter's gradient of
each backward into the current task's flat buffer, while ``p.grad`` keeps accumulating the plain
total as usual (so gradient clipping, grad-norm logging and DDP's reducer see what they always
see). ``step()`` computes the Gram matrix of the task buffers (one matrix product), checks that
``p.grad`` still equals their sum up to a uniform scale (a clip or an AMP unscale), asks the
method for coefficients ``c`` and rewrites ``p.grad`` to ``s · (Σ_t c_t G_t + U)`` — ``s`` the
detected scale, ``U`` the untagged part — before calling the inner step. With ``method="sum"``
``p.grad`` is never touched, so the step is bit-identical to the plain optimizer's.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from . import stats
from .buffers import FlatBuffers
from .distributed import SyncResult, SyncStrategy
from .distributed import detect as detect_distributed
from .methods import MethodContext, MethodSpec, check_coefficients, make_method
from .tasks import TaskError, TaskKey, TaskRegistry, resolve_task

__all__ = ["BalancedOptimizer", "NonFiniteGradientError", "GradientMismatchError"]

logger = logging.getLogger(__name__)

_UNTAGGED = ("untagged",)
_DISCARD = -1
UNTAGGED = "untagged"


def _row_order(key: tuple) -> tuple:
    """Canonical buffer row order: tasks by registry index (then half), untagged last."""
    return (math.inf, 0) if key == _UNTAGGED else (key[1], key[2])


class NonFiniteGradientError(FloatingPointError):
    """A task's gradient holds NaN or Inf (``nonfinite="error"``). ``tasks`` names them."""

    def __init__(self, message: str, tasks: Sequence[str]) -> None:
        super().__init__(message)
        self.tasks = tuple(tasks)


class GradientMismatchError(RuntimeError):
    """``p.grad`` no longer equals (a uniform rescale of) the sum of the captured gradients."""


class BalancedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer``; attribute every backward to a task; correct the update at ``step()``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, fused/foreach variants...).
            Its ``param_groups``, ``state``, ``defaults`` are shared, so LR schedulers, accelerate
            and the HF Trainer use the wrapper unchanged.
        task_key: how :meth:`task` finds a batch's task — a key/column name (default ``"task"``)
            or a callable ``batch -> label(s)``.
        method: a registered method name (``"sum"``, ``"mean"``, ``"normalize"``, ``"pcgrad"``...)
            or a callable ``(gram [K,K] float64, MethodContext) -> coefficients [K]``.
        tasks: the task names, declared up front (fixed indices; an unknown label is an error).
            ``None`` grows the list in order of first sight (single process only).
        estimator: ``"raw"`` (one buffer per task) or ``"split"`` (two buffers per task, alternate
            micro-batches, for the unbiased squared-norm and noise-scale estimates).
        seed: seeds the generator handed to methods (PCGrad's random task order).
        nonfinite: what to do when a task's gradient holds NaN/Inf — ``"error"`` (raise
            :class:`NonFiniteGradientError`; parameters and optimizer state untouched),
            ``"skip_task"`` (drop the task from this step's update), ``"skip_step"`` (no update,
            gradients cleared).
        mismatch_tol: tolerance on ``1 - cos²(p.grad, Σ captured)`` before ``step()`` raises
            :class:`GradientMismatchError` (p.grad changed by something other than a uniform
            rescale, or stale buffers).
        on_step: optional callback receiving :meth:`diagnostics` after every step.
        sync: multi-process DDP only (see ``docs/distributed.md``) — ``"ddp"``: DDP all-reduced
            ``p.grad`` (the last micro-step ran with sync on, as in accelerate's
            ``accumulate()``); ``"buffers"``: every micro-step ran under ``no_sync``, so ``p.grad``
            is local and is rebuilt from the all-reduced task buffers (cheaper: one collective);
            ``"auto"`` (default): told apart at each step by comparing ``p.grad`` across ranks.
            The setting (single process, DDP, FSDP2) is detected when the wrapper is built; a
            multi-process run needs ``tasks`` declared.
        **method_options: passed to the registered method's factory.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        task_key: TaskKey = "task",
        method: MethodSpec = "sum",
        tasks: Sequence[str] | None = None,
        estimator: str = "raw",
        seed: int = 0,
        nonfinite: str = "error",
        mismatch_tol: float = 1e-3,
        on_step: Callable[[dict[str, float]], None] | None = None,
        sync: str = "auto",
        **method_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, BalancedOptimizer):
            raise TypeError("optimizer is already a BalancedOptimizer")
        if estimator not in ("raw", "split"):
            raise ValueError(f"estimator must be 'raw' or 'split', got {estimator!r}")
        if nonfinite not in ("error", "skip_task", "skip_step"):
            raise ValueError(f"nonfinite must be 'error', 'skip_task' or 'skip_step', got {nonfinite!r}")
        self.optimizer = optimizer
        self.task_key = task_key
        self.registry = TaskRegistry(tasks)
        self.method_name = method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)
        self.method = make_method(method, **method_options)
        self.estimator = estimator
        self.nonfinite = nonfinite
        self.mismatch_tol = mismatch_tol
        self.on_step = on_step
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_steps = 0
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._active_row: int | None = None
        self._in_context = False
        self._microbatches: dict[int, int] = {}
        self._diagnostics: dict[str, float] = {}
        self._hooks: list[Any] = []
        self._params: list[torch.Tensor] = []
        self._row_counts: dict[int, int] = {}
        self._synced: SyncResult | None = None
        self._dist: SyncStrategy = detect_distributed(self._trainable(optimizer.param_groups), optimizer, sync)
        self._install(self._trainable(optimizer.param_groups))

    # ------------------------------------------------------------------ delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return (
            f"BalancedOptimizer(method={self.method_name!r}, estimator={self.estimator!r}, "
            f"tasks={list(self.registry.names)}, optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("BalancedOptimizer cannot be pickled (it holds autograd hooks); save state_dict() instead")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._install(self._trainable([self.optimizer.param_groups[-1]]))

    # ------------------------------------------------------------------ hooks and buffers
    @staticmethod
    def _trainable(groups: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
        return [p for g in groups for p in g["params"] if p.requires_grad]

    def _install(self, new_params: list[torch.Tensor]) -> None:
        if self._microbatches or getattr(self, "buffers", None) is not None and self.buffers.used:
            raise RuntimeError("add_param_group in the middle of a step (gradients captured, step() not yet called)")
        seen = {id(p) for p in self._params}
        for p in new_params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            index = len(self._params)
            self._params.append(p)
            if self._dist.uses_hooks:
                self._hooks.append(p.register_hook(self._make_hook(index)))
        # float32 buffers (exact sums of bf16/fp16 micro-batch gradients); float64 for float64 models
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        self.buffers = FlatBuffers([self._dist.local(p) for p in self._params], dtype=dtype, order=_row_order)
        self._dist.setup(self.buffers, len(self.registry), self.registry.declared, self.estimator)

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            row = self._active_row
            if row is None:
                row = self.buffers.row(_UNTAGGED)
            elif row == _DISCARD:
                return  # a task block whose label failed (multi-process: raised collectively at step())
            self.buffers.add(row, index, grad)

        return hook

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the wrapper then sees no gradient; call before discarding it)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _row_for(self, key: tuple) -> int:
        """Row of ``key``; a new row may move others (canonical order): re-key the row counts."""
        buf = self.buffers
        if buf.has(key):
            return buf.index(key)
        by_key = {buf.keys[r]: c for r, c in self._row_counts.items()}
        row = buf.row(key)
        self._row_counts = {buf.index(k): c for k, c in by_key.items()}
        return row

    def _row_key(self, task_index: int, microbatch: int) -> tuple:
        half = self._dist.half(microbatch) if self.estimator == "split" else 0
        return ("task", task_index, half)

    # ------------------------------------------------------------------ attribution
    @contextlib.contextmanager
    def task(self, batch_or_name: Any) -> Iterator[str]:
        """Attribute every backward inside the block to one task.

        ``batch_or_name`` is a task name or a batch (resolved with ``task_key``; a batch mixing
        tasks raises :class:`~balancedmix.tasks.MixedTaskBatchError` — use :meth:`backward`).
        Each block counts as one micro-batch of that task. Yields the task name.

        In a multi-process run a label error (unknown task, mixed batch, missing key) is not
        raised here, where it would leave the other ranks waiting in a collective: the block runs
        with its gradient left out of the task buffers, and ``step()`` raises the error on every
        rank, naming the rank(s) where it happened.
        """
        if self._in_context:
            raise RuntimeError("opt.task(...) blocks cannot be nested")
        try:
            name = resolve_task(batch_or_name, self.task_key, self.registry)
            index = self.registry.index(name)
        except TaskError as exc:
            if not self._dist.defers_task_errors:
                raise
            self._dist.record_error(exc)
            name = batch_or_name if isinstance(batch_or_name, str) else "<invalid task label>"
            row = _DISCARD
        else:
            count = self._microbatches.get(index, 0)
            row = self._row_for(self._row_key(index, count))
            self._microbatches[index] = count + 1
            self._row_counts[row] = self._row_counts.get(row, 0) + 1
        self._active_row = row
        self._in_context = True
        try:
            self._dist.enter_task(self._params)
        except BaseException:  # the strategy refused (DeepSpeed not attached): undo this block's bookkeeping
            self._active_row = None
            self._in_context = False
            if row != _DISCARD:
                self._microbatches[index] -= 1
                self._row_counts[row] -= 1
                for counts, key in ((self._microbatches, index), (self._row_counts, row)):
                    if counts[key] == 0:
                        del counts[key]
            raise
        try:
            yield name
        finally:
            self._active_row = None
            self._in_context = False
            self._dist.exit_task(self._params, self.buffers, None if row == _DISCARD else row)

    def backward(self, losses: Mapping[str, torch.Tensor], retain_graph: bool | None = None) -> None:
        """Exact fallback for a loss that mixes tasks: ``losses = {task: that task's part}``.

        Runs one backward per task over the shared graph (the graph is retained between them),
        so ``Σ_t loss_t`` gets exactly the gradient of the full loss, attributed per task. Costs
        one backward per task: prefer task-homogeneous micro-batches.

        Multi-process: under DDP run it under ``no_sync`` (DDP all-reduces only the first
        backward after a forward; ``step()`` raises ``DistributedStateError`` otherwise); under
        FSDP2 every rank must pass the same tasks in the same order (see ``docs/distributed.md``).
        """
        if not losses:
            raise ValueError("backward() got no losses")
        items = list(losses.items())
        for i, (name, loss) in enumerate(items):
            last = i == len(items) - 1
            with self.task(name):
                loss.backward(retain_graph=retain_graph if last else True)

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the parameters' gradients (inner optimizer) and drop the captured task gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._reset()

    def _reset(self) -> None:
        self.buffers.reset()
        self._microbatches = {}
        self._row_counts = {}
        self._synced = None

    @torch.no_grad()
    def synchronize(self) -> None:
        """Agree on this step across ranks and reduce the task buffers; ``step()`` calls it if you did not.

        Multi-process only (a no-op otherwise). Call it after the last backward and before
        clipping when micro-steps run under ``no_sync`` (``sync="buffers"``): it writes the global
        gradient into ``p.grad``, so a clip then sees the same gradient on every rank. Every rank
        must call it (it runs collectives). Raises, on every rank alike, the task label errors
        deferred by :meth:`task` and :class:`~balancedmix.distributed.DistributedStateError`.
        """
        if self._synced is not None:
            return
        rows = self.buffers.finish()
        try:
            self._synced = self._dist.synchronize(
                self._params, self.buffers, rows, self._microbatches, self._row_counts, self.mismatch_tol
            )
        except BaseException:
            self._reset()
            raise
        self._microbatches = dict(self._synced.task_counts)
        self._row_counts = dict(self._synced.row_counts)

    @property
    def distributed(self) -> SyncStrategy:
        """The distributed strategy in use (``.kind`` is ``"single"``, ``"ddp"`` or ``"fsdp2"``)."""
        return self._dist

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Compute diagnostics, apply the method to ``p.grad``, call the inner ``step``.

        A ``closure`` is evaluated first (with grad enabled); its backward counts as untagged
        unless it opens :meth:`task` blocks itself.
        """
        if self._dist.engine_driven:
            # DeepSpeed ZeRO calls the inner optimizer through this wrapper once per parameter group;
            # the balancing already ran in the pre-step hook on ZeRO's step() (see distributed/deepspeed.py)
            return self.optimizer.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            pre_hook(self, (), {})
        try:
            run_inner = self._prepare_step()
        finally:
            self._reset()
        if run_inner:
            self.optimizer.step()
        self.num_steps += 1
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, (), {})
        if self.on_step is not None:
            self.on_step(dict(self._diagnostics))
        return loss

    @torch.no_grad()
    def _balance_for_engine(self) -> bool:
        """Everything ``step()`` does except the inner step, for an engine that runs the inner step itself.

        Called by the engine strategy's pre-step hook (DeepSpeed ZeRO) with ``p.grad`` of the
        wrapper's parameters (the rank's gradient partitions) set to the gradients the engine is
        about to apply; the correction is written into them. Returns whether the step should run.
        """
        try:
            run_inner = self._prepare_step()
        finally:
            self._reset()
        self.num_steps += 1
        if self.on_step is not None:
            self.on_step(dict(self._diagnostics))
        return run_inner

    def _rebind(self, strategy: SyncStrategy, params: Sequence[torch.Tensor] | None = None) -> None:
        """Switch to ``strategy`` and re-install on ``params`` (default: the optimizer's current parameters).

        Called by an engine's ``attach`` (DeepSpeed ZeRO replaces ``param_groups`` by the rank's
        flat partitions; ZeRO-3 empties them between steps) before any gradient is captured.
        """
        if self._microbatches or self.buffers.used:
            raise RuntimeError("cannot re-bind the BalancedOptimizer in the middle of a step (gradients captured)")
        self.remove_hooks()
        self._dist = strategy
        self._params = []
        self.buffers = None  # type: ignore[assignment]
        self._install(list(params) if params is not None else self._trainable(self.optimizer.param_groups))

    def _prepare_step(self) -> bool:
        """Everything before the inner step. Returns whether to run the inner step."""
        buf = self.buffers
        self.synchronize()
        assert self._synced is not None
        rows = self._synced.rows
        if not rows:
            self._diagnostics = {"step": float(self.num_steps), "buffer_bytes": float(buf.nbytes)}
            if any(p.grad is not None for p in self._params) and self.method_name != "sum":
                raise GradientMismatchError(
                    "step() found gradients in p.grad but no backward was captured since the last step; "
                    "gradients computed before the BalancedOptimizer was created (or written by hand) cannot be "
                    f"corrected by method {self.method_name!r}. Call zero_grad() first."
                )
            return True
        n = len(buf.keys)
        row_gram, grad_dots, grad_sq = self._row_stats()
        self._dist.reduce_stats(row_gram, grad_dots, grad_sq)  # FSDP2: sums of local shard products
        row_gram = row_gram.cpu()
        grad_dots = grad_dots.cpu()
        grad_sq_f = float(grad_sq)

        # ---- group rows by task
        task_rows: dict[int, list[int]] = {}
        untagged_row: int | None = None
        for r in rows:
            key = buf.keys[r]
            if key == _UNTAGGED:
                untagged_row = r
            else:
                task_rows.setdefault(key[1], []).append(r)
        task_ids = sorted(task_rows)
        names = [self.registry.name(t) for t in task_ids]
        diag_rows = torch.diagonal(row_gram)
        bad = [self.registry.name(t) for t in task_ids if not all(math.isfinite(float(diag_rows[r])) for r in task_rows[t])]
        untagged_bad = untagged_row is not None and not math.isfinite(float(diag_rows[untagged_row]))
        if bad or untagged_bad:
            return self._handle_nonfinite(bad + ([UNTAGGED] if untagged_bad else []), task_rows, untagged_row, names, task_ids)
        if not math.isfinite(grad_sq_f):
            raise NonFiniteGradientError(
                "p.grad holds NaN/Inf although every captured task gradient is finite "
                "(was p.grad modified, or did a backward run outside the wrapper's parameters?)",
                [],
            )

        # ---- task-level Gram (halves summed), extended with the untagged part as a last entry
        groups = [task_rows[t] for t in task_ids] + ([[untagged_row]] if untagged_row is not None else [])
        agg = self._group_rows(groups, n)
        gram_ext = agg @ row_gram @ agg.T
        k = len(task_ids)
        total_sq = float(gram_ext.sum())
        total_dot = float(agg.sum(0) @ grad_dots)

        # ---- p.grad = s · total? (uniform rescale: clipping or AMP unscale)
        if total_sq > 0:
            scale = total_dot / total_sq
            cos2 = (total_dot * total_dot) / (total_sq * grad_sq_f) if grad_sq_f > 0 else 0.0
            if 1.0 - cos2 > self.mismatch_tol:
                raise GradientMismatchError(
                    f"p.grad is not a uniform rescale of the captured task gradients (cos² = {cos2:.6f}); p.grad was "
                    "changed between backward and step (per-parameter clipping, manual edits) or zeroed without "
                    "zero_grad() on the optimizer (e.g. model.zero_grad() mid-step). Parameters were not updated."
                )
        else:
            scale = 1.0
            if grad_sq_f > 0:
                raise GradientMismatchError(
                    "the captured task gradients are all zero but p.grad is not; gradients were produced outside "
                    "the wrapper's hooks. Parameters were not updated."
                )

        coef, coef_ext = self._coefficients(gram_ext, names)
        if k and not bool(torch.all(coef == 1.0)):
            weights = torch.zeros(n, dtype=torch.float64)
            for t_i, members in enumerate(groups[:k]):
                weights[members] = scale * (float(coef[t_i]) - 1.0)
            self._add_to_grads(weights, rebuild=False)

        self._diagnostics = self._compute_diagnostics(
            names, task_ids, task_rows, untagged_row, row_gram, gram_ext, coef_ext, scale, grad_sq_f
        )
        return True

    @staticmethod
    def _group_rows(groups: Sequence[Sequence[int]], n: int) -> torch.Tensor:
        """``[len(groups), n]`` 0/1 matrix summing buffer rows into groups (a task's halves; untagged)."""
        agg = torch.zeros(len(groups), n, dtype=torch.float64)
        for gi, members in enumerate(groups):
            agg[gi, list(members)] = 1.0
        return agg

    def _coefficients(self, gram_ext: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's coefficients for the ``K = len(names)`` tasks (the first K entries of
        ``gram_ext``), and the same extended with 1 for the untagged entry if ``gram_ext`` has it."""
        k = len(names)
        if k:
            ctx = MethodContext(tasks=tuple(names), step=self.num_steps, generator=self.generator)
            coef = check_coefficients(self.method(gram_ext[:k, :k].clone(), ctx), names, self.method_name)
        else:
            coef = torch.zeros(0, dtype=torch.float64)
        return coef, torch.cat([coef, torch.ones(gram_ext.shape[0] - k, dtype=torch.float64)])

    def _row_stats(self, with_grads: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gram of all buffer rows ``[n, n]``, their dot products with ``p.grad`` ``[n]`` and ``‖p.grad‖²``.

        One pass over the buffer in cache-sized chunks: each chunk's Gram block and its dot
        products with ``p.grad`` are computed back to back (the second read hits the cache), in
        float32, and summed across chunks in float64 — a single float32 accumulation over 10⁷
        elements loses enough to misjudge nearly opposite task gradients. Local shards only
        (FSDP2 sums them across ranks afterwards). Float64 tensors on the buffers' device.
        """
        buf = self.buffers
        data = buf.data
        n = data.shape[0]
        row_gram = torch.zeros(n, n, dtype=torch.float64, device=data.device)
        grad_dots = torch.zeros(n, dtype=torch.float64, device=data.device)
        grad_sq = torch.zeros((), dtype=torch.float64, device=data.device)
        for i, p in enumerate(self._params):
            offset = buf.offsets[i]
            grad = self._dist.local(p.grad).reshape(-1) if with_grads and p.grad is not None else None
            for start, stop in buf.chunks(i):
                block = data[:, offset + start : offset + stop]
                row_gram += (block @ block.T).to(torch.float64)
                if grad is not None:
                    g = grad[start:stop].to(buf.dtype)
                    grad_dots += (block @ g).to(torch.float64)
                    grad_sq += torch.dot(g, g).to(torch.float64)
        return row_gram, grad_dots, grad_sq

    def _add_to_grads(self, weights: torch.Tensor, rebuild: bool) -> None:
        """``p.grad += Σ_r w_r B_r`` per parameter (or ``p.grad = Σ_r w_r B_r`` when ``rebuild``).

        Chunked like :meth:`_row_stats`; ``w @ block`` (a non-transposed matrix-vector product)
        is several times faster than ``block.T @ w`` on wide slices such as an embedding.
        """
        buf = self.buffers
        w = weights.to(device=buf.data.device, dtype=buf.dtype)
        for i, p in enumerate(self._params):
            if p.grad is None:
                continue
            grad = self._dist.local(p.grad)  # FSDP2: the local shard (shares p.grad's storage)
            offset = buf.offsets[i]
            if grad.is_contiguous():
                flat = grad.view(-1)
                for start, stop in buf.chunks(i):
                    upd = w @ buf.data[:, offset + start : offset + stop]
                    if rebuild:
                        flat[start:stop].copy_(upd)
                    else:
                        flat[start:stop].add_(upd)
                continue
            upd = (w @ buf.data[:, buf.slice(i)]).view_as(grad)
            if rebuild:
                grad.copy_(upd)
            else:
                grad.add_(upd)

    def _handle_nonfinite(
        self,
        bad: list[str],
        task_rows: dict[int, list[int]],
        untagged_row: int | None,
        names: list[str],
        task_ids: list[int],
    ) -> bool:
        buf = self.buffers
        bad_rows = [r for t in task_ids if self.registry.name(t) in bad for r in task_rows[t]]
        if UNTAGGED in bad and untagged_row is not None:
            bad_rows.append(untagged_row)
        self._diagnostics = {"step": float(self.num_steps), "nonfinite_tasks": float(len(bad))}
        for name in bad:
            self._diagnostics[f"nonfinite/{name}"] = 1.0
        if self.nonfinite == "error":
            buf.zero_rows(bad_rows)
            raise NonFiniteGradientError(
                f"NaN/Inf gradient in task(s) {bad} at step {self.num_steps}; parameters and optimizer state were not "
                "changed. Call zero_grad() and continue, or use nonfinite='skip_task' / 'skip_step'.",
                bad,
            )
        logger.warning("step %d: NaN/Inf gradient in task(s) %s; policy %s", self.num_steps, bad, self.nonfinite)
        if self.nonfinite == "skip_step":
            buf.zero_rows(bad_rows)
            for p in self._params:
                p.grad = None
            return False
        # skip_task: rebuild p.grad from the finite tasks with the method's coefficients (scale 1: a
        # clip of a NaN total is NaN, so no scale can be recovered from p.grad).
        good_ids = [t for t in task_ids if self.registry.name(t) not in bad]
        good_names = [self.registry.name(t) for t in good_ids]
        buf.zero_rows(bad_rows)
        n = len(buf.keys)
        row_gram, no_dots, no_sq = self._row_stats(with_grads=False)
        self._dist.reduce_stats(row_gram, no_dots, no_sq)
        row_gram = row_gram.cpu()
        groups = [task_rows[t] for t in good_ids]
        if untagged_row is not None and UNTAGGED not in bad:
            groups.append([untagged_row])
        agg = self._group_rows(groups, n)
        gram_ext = agg @ row_gram @ agg.T
        _, coef_ext = self._coefficients(gram_ext, good_names)
        weights = torch.zeros(n, dtype=torch.float64)
        for gi, members in enumerate(groups):
            weights[members] = float(coef_ext[gi])
        self._add_to_grads(weights, rebuild=True)
        diag = self._compute_diagnostics(
            good_names,
            good_ids,
            {t: task_rows[t] for t in good_ids},
            untagged_row if UNTAGGED not in bad else None,
            row_gram,
            gram_ext,
            coef_ext,
            1.0,
            float("nan"),
        )
        diag.update(self._diagnostics)
        self._diagnostics = diag
        return True

    # ------------------------------------------------------------------ diagnostics
    def _compute_diagnostics(
        self,
        names: list[str],
        task_ids: list[int],
        task_rows: dict[int, list[int]],
        untagged_row: int | None,
        row_gram: torch.Tensor,
        gram_ext: torch.Tensor,
        coef_ext: torch.Tensor,
        scale: float,
        grad_sq: float,
    ) -> dict[str, float]:
        k = len(names)
        out: dict[str, float] = {"step": float(self.num_steps)}
        task_norms = stats.norms(gram_ext)
        shares = stats.update_shares(gram_ext, coef_ext)
        cos = stats.cosines(gram_ext[:k, :k])
        for i, name in enumerate(names):
            out[f"grad_norm/{name}"] = float(task_norms[i])
            out[f"update_share/{name}"] = float(shares[i])
            out[f"coef/{name}"] = float(coef_ext[i])
        for i in range(k):
            for j in range(i + 1, k):
                out[f"cos/{names[i]}/{names[j]}"] = float(cos[i, j])
        if untagged_row is not None:
            out[f"grad_norm/{UNTAGGED}"] = float(task_norms[k])
            out[f"update_share/{UNTAGGED}"] = float(shares[k])
        out["grad_norm/total"] = math.sqrt(max(float(gram_ext.sum()), 0.0))
        out["grad_norm/update"] = abs(scale) * math.sqrt(max(float(stats.combined_sqnorm(gram_ext, coef_ext)), 0.0))
        out["grad_scale"] = float(scale)
        if self.estimator == "split":
            for t, name in zip(task_ids, names):
                m = self._microbatches.get(t, 0)
                members = task_rows[t]
                if len(members) != 2:
                    continue  # one micro-batch: no unbiased estimate
                a, b = members
                n_a, n_b = self._row_counts.get(a, 0), self._row_counts.get(b, 0)
                if n_a < 1 or n_b < 1:
                    continue
                dot_ab = float(row_gram[a, b])
                est = stats.split_half_sqnorm(dot_ab, n_a, n_b)
                trace = stats.split_half_noise_trace(float(row_gram[a, a]), float(row_gram[b, b]), dot_ab, n_a, n_b)
                out[f"grad_sqnorm_unbiased/{name}"] = est
                out[f"grad_norm_unbiased/{name}"] = math.sqrt(max(est, 0.0))
                out[f"noise_trace/{name}"] = trace
                out[f"noise_scale/{name}"] = stats.noise_scale(trace, est / (m * m))
        for t, name in enumerate(self.registry.names):
            out[f"num_microbatches/{name}"] = float(self._microbatches.get(t, 0))
        out["buffer_bytes"] = float(self.buffers.nbytes)
        if self._dist.world_size > 1 and self._synced is not None:
            out["buffer_bytes"] = self._synced.extra.get("buffer_bytes_max", out["buffer_bytes"])
            out["comm_bytes"] = float(self._synced.comm_bytes + self._dist.stats_bytes)
        return out

    def captured_gradients(self) -> dict[str, torch.Tensor]:
        """Copies of the gradients captured since the last step, per task (halves summed).

        Returns ``{task: flat float32 tensor [P]}`` in the order of the optimizer's trainable
        parameters, with an ``"untagged"`` entry for backwards run outside :meth:`task`. For
        inspection and tests; ``step()`` consumes the buffers without copying them.
        """
        buf = self.buffers
        rows = buf.finish()
        out: dict[str, torch.Tensor] = {}
        for r in rows:
            key = buf.keys[r]
            name = UNTAGGED if key == _UNTAGGED else self.registry.name(key[1])
            if name in out:
                out[name] += buf.data[r]
            else:
                out[name] = buf.data[r].clone()
        return out

    def diagnostics(self) -> dict[str, float]:
        """The last step's figures as a flat ``{name: float}`` dict (see ``docs/diagnostics.md``).

        Keys: ``grad_norm/<task>`` (L2 norm of the task's summed gradient, before correction and
        clipping), ``grad_norm_unbiased/<task>`` and ``grad_sqnorm_unbiased/<task>``,
        ``noise_trace/<task>``, ``noise_scale/<task>`` (split estimator, ≥2 micro-batches),
        ``update_share/<task>`` (share of the applied update, sums to 1), ``coef/<task>``,
        ``cos/<a>/<b>``, ``grad_norm/total`` (norm of the plain summed gradient, pre-clip),
        ``grad_norm/update`` (norm of the gradient handed to the inner optimizer),
        ``grad_scale`` (uniform rescale detected on p.grad, 1.0 without clipping),
        ``num_microbatches/<task>``, ``buffer_bytes``, ``step``. Tasks absent from the step have
        only ``num_microbatches/<task> = 0``.
        """
        return dict(self._diagnostics)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus a ``"balancedmix"`` entry with the wrapper's own."""
        sd = dict(self.optimizer.state_dict())
        method_state = self.method.state_dict() if hasattr(self.method, "state_dict") else None
        sd["balancedmix"] = {
            "tasks": self.registry.state_dict(),
            "num_steps": self.num_steps,
            "generator": self.generator.get_state(),
            "method": method_state,
            "method_name": self.method_name,
            "estimator": self.estimator,
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        own = sd.pop("balancedmix", None)
        self.optimizer.load_state_dict(sd)
        if own is None:
            logger.warning("loading a state dict without balancedmix state: task registry and step count kept")
            return
        if own.get("method_name") != self.method_name:
            logger.warning("state dict was saved with method %r, loading into %r", own.get("method_name"), self.method_name)
        self.registry.load_state_dict(own["tasks"])
        self.num_steps = int(own["num_steps"])
        self.generator.set_state(torch.as_tensor(own["generator"]).cpu())
        if own.get("method") is not None and hasattr(self.method, "load_state_dict"):
            self.method.load_state_dict(own["method"])
