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

How it works: gradient hooks on every trainable parameter add the parameter's gradient of
each backward into the current task's flat buffer (only gradients accumulated into ``p.grad``:
``torch.autograd.grad`` is not captured), while ``p.grad`` keeps accumulating the plain
total as usual (so gradient clipping, grad-norm logging and DDP's reducer see what they always
see). ``step()`` computes the Gram matrix of the task buffers (one matrix product), checks that
``p.grad`` still equals their sum up to a uniform scale (a clip or an AMP unscale), asks the
method for coefficients ``c`` and rewrites ``p.grad`` to ``s · (Σ_t c_t G_t + U)`` — ``s`` the
detected scale, ``U`` the untagged part — before calling the inner step. With ``method="sum"``
``p.grad`` is never touched, so the step is bit-identical to the plain optimizer's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import numbers
import operator
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from . import stats
from .direct import DirectCapture
from .storage import GradientStorage, make_storage
from .distributed import SyncResult, SyncStrategy
from .distributed import detect as detect_distributed
from .methods import MethodContext, MethodSpec, check_coefficients, make_method
from .tasks import TaskError, TaskKey, TaskRegistry, resolve_task

__all__ = ["BalancedOptimizer", "NonFiniteGradientError", "GradientMismatchError", "ParametersChangedError"]

logger = logging.getLogger(__name__)

_UNTAGGED = ("untagged",)
_DISCARD = -1
UNTAGGED = "untagged"


def _row_order(key: tuple) -> tuple:
    """Canonical buffer row order: tasks by registry index (then half), untagged last."""
    return (math.inf, 0) if key == _UNTAGGED else (key[1], key[2])


def _check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before anything is hooked, an optimizer the wrapper cannot serve (``docs/optimizers.md``)."""
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(
            f"{name} is not supported: it needs sparse gradients and balancedmix captures dense gradients only. Use "
            "Adam/AdamW with dense gradients (nn.Embedding(sparse=False)); supported optimizers: docs/optimizers.md"
        )
    meta = [
        f"group {gi} parameter {pi} {tuple(p.shape)}"
        for gi, group in enumerate(optimizer.param_groups)
        for pi, p in enumerate(group["params"])
        if p.is_meta
    ]
    if meta:
        listed = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"{name} holds {len(meta)} parameter(s) on the meta device ({listed}): they have no data, so no gradient "
            "can be captured or applied. Materialise the model first (model.to_empty(device=...), then load or "
            "initialise the weights) and build the optimizer over the materialised parameters"
        )


def _check_measure(measure: Iterable[torch.Tensor] | None, trainable: Sequence[torch.Tensor]) -> set[int] | None:
    """Ids of the parameters to measure, or ``None`` for all of them (also when ``measure`` names them all)."""
    if measure is None:
        return None
    if isinstance(measure, torch.Tensor):
        measure = [measure]
    try:
        items = list(measure)
    except TypeError:
        raise TypeError(f"measure must be an iterable of parameters (or None), got {type(measure).__name__}") from None
    if not items:
        raise ValueError("measure is empty: give at least one of the optimizer's trainable parameters (or None for all)")
    known = {id(p) for p in trainable}
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor) or id(p) not in known:
            what = f"a {type(p).__name__}" if not isinstance(p, torch.Tensor) else f"a tensor of shape {tuple(p.shape)}"
            raise ValueError(
                f"measure[{i}] is {what} that is not one of the optimizer's trainable parameters; pass parameters "
                "of the wrapped optimizer (e.g. model.layers[-1].parameters())"
            )
    ids = {id(p) for p in items}
    return None if ids == known else ids


def _check_mismatch_tol(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"mismatch_tol must be a number in [0, 1), got {value!r}")
    tol = float(value)
    if not (math.isfinite(tol) and 0.0 <= tol < 1.0):
        raise ValueError(
            f"mismatch_tol must be a finite number in [0, 1) (a tolerance on 1 - cos², default 1e-3), got {tol}; "
            "NaN, negative values and values >= 1 would disable or break the consistency check"
        )
    return tol


def _check_seed(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"seed must be an integer, got {value!r}")
    try:
        seed = operator.index(value)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {value!r} of type {type(value).__name__}") from None
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64) (torch.Generator.manual_seed), got {seed}")
    return seed


class NonFiniteGradientError(FloatingPointError):
    """A task's gradient holds NaN or Inf (``nonfinite="error"``). ``tasks`` names them."""

    def __init__(self, message: str, tasks: Sequence[str]) -> None:
        super().__init__(message)
        self.tasks = tuple(tasks)


class GradientMismatchError(RuntimeError):
    """``p.grad`` no longer equals (a uniform rescale of) the sum of the captured gradients."""


class ParametersChangedError(RuntimeError):
    """The optimizer's trainable parameters changed while this step's gradients were being captured,
    or this wrapper was replaced by a newer one built on the same parameters.

    Raised before anything is changed: parameters and optimizer state are as they were.
    """


# id(param) -> (weakref to the param, weakref to the BalancedOptimizer hooking it): one live wrapper
# per parameter, so a rebuilt wrapper replaces the old one instead of stacking hooks on top of it
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _forget_param(key: int) -> Callable[[Any], None]:
    def callback(_: Any) -> None:
        _OWNERS.pop(key, None)

    return callback


def _owner_of(p: torch.Tensor) -> BalancedOptimizer | None:
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]()


def _remove_handles(handles: list[Any]) -> None:
    """Finalizer of a collected wrapper: detach its hooks (the list is shared with the wrapper)."""
    for h in handles:
        h.remove()
    handles.clear()


class _HookTrampoline:
    """A hook on a parameter that holds only a weak reference to the wrapper, so parameters never
    keep it alive. ``kind`` 0 is the tensor hook (called with the gradient), 1 the post-accumulate
    hook (called with the parameter); see :meth:`BalancedOptimizer._make_hooks`."""

    __slots__ = ("ref", "index", "kind")

    def __init__(self, ref: weakref.ref, index: int, kind: int) -> None:
        self.ref = ref
        self.index = index
        self.kind = kind

    def __call__(self, arg: torch.Tensor) -> Any:
        owner = self.ref()
        if owner is None:
            return None
        return owner._hook_fns[self.index][self.kind](arg)


class BalancedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer``; attribute every backward to a task; correct the update at ``step()``.

    Args:
        optimizer: a ``torch.optim.Optimizer`` that reads dense gradients from ``p.grad`` (every
            ``torch.optim`` optimizer but ``SparseAdam``, which is refused; ``LBFGS`` through
            ``step(closure)``; see ``docs/optimizers.md``). Its parameters must be materialised
            (meta-device parameters are refused). Its ``param_groups``, ``state``, ``defaults``
            are shared, so LR schedulers, accelerate and the HF Trainer use the wrapper unchanged.
        task_key: how :meth:`task` finds a batch's task — a key/column name (default ``"task"``)
            or a callable ``batch -> label(s)``.
        method: a registered method name (``"sum"``, ``"mean"``, ``"normalize"``, ``"pcgrad"``...)
            or a callable ``(gram [K,K] float64, MethodContext) -> coefficients [K]``.
        tasks: the task names, declared up front as a list (fixed indices; an unknown label is an
            error). ``None`` grows the list in order of first sight (single process only). A name
            is non-empty, has no ``/`` and is not ``total``, ``update`` or ``untagged`` (metric
            keys, see ``docs/diagnostics.md``).
        estimator: ``"raw"`` (one buffer per task) or ``"split"`` (two buffers per task, alternate
            micro-batches, for the unbiased squared-norm and noise-scale estimates).
        seed: an integer in ``[-2**63, 2**64)``; seeds the generator handed to methods (PCGrad's
            random task order).
        nonfinite: what to do when a task's gradient holds NaN/Inf — ``"error"`` (raise
            :class:`NonFiniteGradientError`; parameters and optimizer state untouched),
            ``"skip_task"`` (drop the task from this step's update; no step at all when no task
            is finite), ``"skip_step"`` (no update, gradients cleared).
        mismatch_tol: tolerance on ``1 - cos²(p.grad, Σ captured)`` before ``step()`` raises
            :class:`GradientMismatchError` (p.grad changed by something other than a uniform
            rescale, a forgotten ``zero_grad()``, or stale buffers); a finite number in ``[0, 1)``.
        on_step: optional callback receiving :meth:`diagnostics` after every step.
        sync: multi-process DDP only (see ``docs/distributed.md``) — ``"ddp"``: DDP all-reduced
            ``p.grad`` (the last micro-step ran with sync on, as in accelerate's
            ``accumulate()``); ``"buffers"``: every micro-step ran under ``no_sync``, so ``p.grad``
            is local and is rebuilt from the all-reduced task buffers (cheaper: one collective;
            in sketch mode ``p.grad`` itself is all-reduced at :meth:`synchronize`, after a
            check in sketch space that it is this rank's total; refused with ``measure=``
            alone); ``"auto"`` (default): told apart at each step by comparing ``p.grad`` across ranks.
            The setting (single process, DDP, FSDP2) is detected when the wrapper is built, and
            again when the optimizer's trainable parameters change between steps (accelerate's
            ``prepare`` under FSDP2, staged unfreezing, a new group): the hooks follow them
            (:class:`ParametersChangedError` if they change mid-step). A multi-process run needs
            ``tasks`` declared. One wrapper per parameter: a new one replaces an older one.
        sketch_dim: ``None`` (default): exact per-task gradients in ``K × P`` float32 buffers.
            An integer ``d``: *sketch mode* — each task keeps a ``d``-dimensional CountSketch of
            its gradient (``K × d`` values, no task buffers); every figure is an unbiased estimate
            with its standard error in ``*_se/<task>`` keys, and the method's coefficients act
            one step late: those computed at step ``n`` scale the task gradients of step ``n+1``
            inside the gradient hooks, so ``p.grad`` holds the corrected update directly (see
            "Sketch mode" in ``docs/diagnostics.md``). Single process, DDP (the last micro-step
            of a step synced by DDP) and FSDP2; not with ``nonfinite="skip_task"`` or LBFGS.
        measure: ``None`` (default): every trainable parameter is measured. An iterable of some
            of the optimizer's trainable parameters (e.g. the last block's, as a proxy): only
            their gradients are captured, exactly (or sketched, with ``sketch_dim``), so the
            memory is ``K × (their size)`` and every figure describes that subset; the method's
            coefficients, computed from the subset, then scale the *whole* model's gradients one
            step late through the hooks, as in sketch mode (the other parameters' gradients
            are not kept, so they cannot be corrected at ``step()``). Not under FSDP2.
        capture: ``"hooks"`` (default): ``p.grad`` accumulates the plain total and the hooks copy
            each gradient into its task's row (``sum`` is bit-identical to the plain optimizer).
            ``"direct"``: ``p.grad`` *is* the active task's row during its backward, so autograd
            accumulates straight into the row (no copy) and ``step()`` writes ``Σ_t c_t G_t`` into
            ``p.grad``; cheaper at short micro-batches, but single process only, ``p.grad`` unusable
            between the backward and ``step()`` (no clipping, no GradScaler), float32/float64
            parameters, and ``sum`` equal to the plain optimizer only up to float32 rounding
            (see ``balancedmix/direct.py`` and "Capture modes" in ``docs/diagnostics.md``).
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
        sketch_dim: int | None = None,
        measure: Iterable[torch.Tensor] | None = None,
        capture: str = "hooks",
        **method_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, BalancedOptimizer):
            raise TypeError("optimizer is already a BalancedOptimizer")
        if estimator not in ("raw", "split"):
            raise ValueError(f"estimator must be 'raw' or 'split', got {estimator!r}")
        if capture not in ("hooks", "direct"):
            raise ValueError(f"capture must be 'hooks' or 'direct', got {capture!r}")
        if nonfinite not in ("error", "skip_task", "skip_step"):
            raise ValueError(f"nonfinite must be 'error', 'skip_task' or 'skip_step', got {nonfinite!r}")
        if sketch_dim is not None and (
            isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or not 1 <= sketch_dim <= 1 << 30
        ):
            raise ValueError(f"sketch_dim must be None or an integer in [1, 2^30], got {sketch_dim!r}")
        self.sketch_dim = sketch_dim
        self._measure_ids = _check_measure(measure, self._trainable(optimizer.param_groups))
        lagged = sketch_dim is not None or self._measure_ids is not None
        what = "sketch mode (sketch_dim)" if sketch_dim is not None else "a measured parameter subset (measure=)"
        if lagged and nonfinite == "skip_task":
            raise ValueError(
                f"nonfinite='skip_task' rebuilds p.grad from every task gradient without the bad task; {what} keeps "
                "no such gradients: use nonfinite='error' or 'skip_step', or exact mode over all parameters"
            )
        if lagged and isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                f"LBFGS re-evaluates the closure within a step, and {what} applies the previous step's coefficients in "
                "the gradient hooks while a step computes the next ones: use exact mode over all parameters with LBFGS"
            )
        if capture == "direct" and lagged:
            raise ValueError(
                f"capture='direct' accumulates gradients into exact task rows over every parameter; {what} keeps no such "
                "rows: use capture='hooks'"
            )
        if capture == "direct" and isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("capture='direct' does not support LBFGS (closure re-evaluations): use capture='hooks'")
        _check_supported(optimizer)
        mismatch_tol = _check_mismatch_tol(mismatch_tol)
        seed = _check_seed(seed)
        if not (isinstance(task_key, str) or callable(task_key)):
            raise TypeError(f"task_key must be a key name (str) or a callable batch -> label(s), got {task_key!r}")
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be a callable receiving the diagnostics dict (or None), got {on_step!r}")
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
        self._parked: tuple[int, torch.Tensor | None] | None = None  # gradient parked by a tensor hook
        self._grad_scaler: torch.amp.GradScaler | None = None
        self._amp_token: object | None = None  # the scaler's per-iteration state when this step's first capture ran
        self._unit = 1.0  # 1 / loss scale of the step being prepared (buffers hold loss-scaled gradients)
        self._amp_scale: float | None = None  # loss scale handed over by GradScaler.step (unattached protocol)
        self._hook_fns: list[tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], None]]] = []
        self._params: list[torch.Tensor] = []
        self._param_ids: frozenset[int] = frozenset()
        self._frozen_ids: frozenset[int] = frozenset()
        self._signature: tuple[int, ...] = ()
        self._replaced_by: str | None = None
        self._sync_mode = sync
        self._row_counts: dict[int, int] = {}
        self._synced: SyncResult | None = None
        self._step_coef: dict[str, float] = {}  # this step's coefficients by task (closure re-evaluations)
        self._frozen_coef: dict[str, float] | None = None  # set while a closure is re-evaluated
        self._grad_left: float | None = None  # ‖p.grad‖ left by the last step (until zero_grad())
        self._warned_untagged = False
        self._lagged_what = what if lagged else None  # refusals checked by _install() for the detected engine
        self.capture = capture
        self._direct: DirectCapture | None = None  # capture="direct": p.grad is the active row (see direct.py)
        self.buffers: GradientStorage
        self._weakself = weakref.ref(self)
        weakref.finalize(self, _remove_handles, self._hooks)
        self._install()

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
        """Add a group to the inner optimizer and hook its parameters (between steps only).

        Raises:
            ParametersChangedError: gradients of the current step were already captured; the
                inner optimizer is left unchanged (add the group after ``step()``/``zero_grad()``).
        """
        if self._replaced_by is not None:
            raise ParametersChangedError(self._replaced_by)
        if self._pending():
            raise ParametersChangedError(
                "add_param_group in the middle of a step (gradients captured, step() not called yet): the new group "
                "was not added; add it after step() or zero_grad()"
            )
        params = param_group.get("params", [])
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        self._check_hookable([q for q in params if q.requires_grad])  # before the inner optimizer takes the group
        self.optimizer.add_param_group(param_group)
        self._install()

    # ------------------------------------------------------------------ hooks and buffers
    @staticmethod
    def _trainable(groups: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
        return [p for g in groups for p in g["params"] if p.requires_grad]

    def _current_signature(self) -> tuple[int, ...]:
        # ids of the trainable parameters, in order. self._params holds the hooked tensors alive, so an
        # equal tuple means the very same tensors (no id reuse); O(number of parameter tensors).
        return tuple(id(p) for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad)

    def _pending(self) -> bool:
        """Gradients of the current step were captured (or a task block is open)."""
        buffers = getattr(self, "buffers", None)
        return bool(self._in_context or self._microbatches or (buffers is not None and buffers.used))

    def _check_parameters(self, where: str) -> None:
        """Follow the optimizer's parameters: re-detect and re-hook if they changed since the install.

        Called at the first ``task()`` of a step, by :meth:`synchronize` and by :meth:`refresh`.
        Between steps (nothing captured) the wrapper re-installs on the new parameters; with
        captured gradients pending it raises :class:`ParametersChangedError` instead.
        """
        if self._replaced_by is not None:
            raise ParametersChangedError(self._replaced_by)
        if self._dist.engine_driven:
            return  # the engine (DeepSpeed ZeRO) owns param_groups (flat partitions; ZeRO-3 empties them between steps)
        signature = self._current_signature()
        if signature == self._signature:
            return
        what = self._describe_change(signature)
        if self._pending():
            raise ParametersChangedError(
                f"the optimizer's trainable parameters changed during this step ({what}), detected at "
                f"{where}: the gradients captured so far belong to the old parameters. Nothing was updated. Change "
                "param_groups or requires_grad between steps only; call zero_grad() and run the step again (the "
                "wrapper then hooks the new parameters)."
            )
        self._reset()
        previous = self._dist.kind
        self._install()
        had_grad = [p for p in self._params if p.grad is not None]
        logger.info(
            "BalancedOptimizer re-installed on the optimizer's new parameters (%s); engine %s -> %s",
            what, previous, self._dist.kind,
        )
        if where == "synchronize()/step()" and had_grad:
            raise ParametersChangedError(
                f"the optimizer's trainable parameters changed before this step's backward ({what}), so its "
                "gradients were not captured (detected at step()). Nothing was updated. The wrapper now hooks the new "
                "parameters: call zero_grad() and run the step again. Open a task block (opt.task) before the first "
                "backward after changing param_groups/requires_grad, or call opt.refresh()."
            )

    def _describe_change(self, signature: tuple[int, ...]) -> str:
        old_ids, new_ids = self._param_ids, set(signature)
        in_groups = {id(p): p for g in self.optimizer.param_groups for p in g["params"]}
        appeared = new_ids - old_ids
        unfrozen = appeared & self._frozen_ids
        swapped = appeared - unfrozen
        gone = old_ids - new_ids
        frozen = {i for i in gone if i in in_groups and not in_groups[i].requires_grad}
        removed = gone - frozen
        what = []
        if swapped:
            what.append(
                f"{len(swapped)} new tensor(s) in param_groups (swapped, e.g. by accelerate's prepare under FSDP2, or a "
                "group added to the inner optimizer)"
            )
        if removed:
            what.append(f"{len(removed)} hooked tensor(s) no longer in param_groups")
        if unfrozen:
            what.append(f"{len(unfrozen)} parameter(s) got requires_grad=True after the wrapper was built")
        if frozen:
            what.append(f"{len(frozen)} parameter(s) got requires_grad=False")
        return "; ".join(what) or "the order of the parameters in param_groups changed"

    def refresh(self) -> None:
        """Check now that the hooked parameters are still the optimizer's (see :meth:`_check_parameters`).

        Call it after anything that may replace ``param_groups`` (``accelerator.prepare``) if you
        need ``distributed`` to be up to date before the next ``task()`` block (which checks
        anyway). Raises :class:`ParametersChangedError` if they changed with gradients pending.
        """
        self._check_parameters("refresh()")

    def _install(self, params: Sequence[torch.Tensor] | None = None, dist: SyncStrategy | None = None) -> None:
        """Hook every trainable parameter of the optimizer (or ``params``) under the detected engine
        (or ``dist``, given by an engine's ``attach``). Nothing may be pending."""
        params = self._trainable(self.optimizer.param_groups) if params is None else list(params)
        unique: list[torch.Tensor] = []
        seen: set[int] = set()
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        self._check_hookable(unique)
        if dist is None:
            dist = detect_distributed(unique, self.optimizer, self._sync_mode)
        ids = self._measure_ids
        measured_idx = [i for i, p in enumerate(unique) if ids is None or id(p) in ids]
        if not measured_idx:
            raise ValueError(
                "none of the parameters given as measure= is a trainable parameter of the optimizer any more (frozen or "
                "replaced); build the wrapper with measure= naming current parameters"
            )
        what = self._lagged_what
        if what is not None and self.sketch_dim is None and dist.kind == "ddp" and self._sync_mode == "buffers":
            raise ValueError(
                f"sync='buffers' rebuilds p.grad from the task buffers, which {what} does not allow: use sync='ddp' or "
                "'auto' (DDP must all-reduce p.grad on the last micro-step)"
            )
        if what is not None and dist.kind.startswith("deepspeed"):
            from .distributed import UnsupportedDistributedError

            raise UnsupportedDistributedError(
                f"{what} is not supported under DeepSpeed ZeRO (the engine applies the update from its own gradient "
                "partitions, where no hook can apply a lagged coefficient): use exact mode over all parameters"
            )
        if self._measure_ids is not None and dist.kind == "fsdp2":
            from .distributed import UnsupportedDistributedError

            raise UnsupportedDistributedError(
                "a measured parameter subset (measure=) is not supported under FSDP2 (its task blocks capture every "
                "parameter's gradient shard): measure all parameters, exactly or with sketch_dim"
            )
        if self.capture == "direct":
            self._check_direct(unique, dist)
        # a live wrapper already hooking one of these parameters is replaced (its hooks removed)
        for old in {id(o): o for p in unique if (o := _owner_of(p)) is not None and o is not self}.values():
            if old._replaced_by is None:
                old._detach(
                    "this BalancedOptimizer was replaced by a newer BalancedOptimizer built on the same parameters; "
                    "its hooks were removed. Use the new wrapper (or call remove_hooks() on an old one before "
                    "building another)."
                )
                logger.warning("a BalancedOptimizer was built on parameters already wrapped: the older wrapper was replaced")
        self.remove_hooks()
        self._dist = dist
        self._params = unique
        self._param_ids = frozenset(seen)
        self._frozen_ids = frozenset(id(p) for g in self.optimizer.param_groups for p in g["params"] if not p.requires_grad)
        self._signature = self._current_signature()
        self._hook_fns = []
        for index, p in enumerate(unique):
            _OWNERS[id(p)] = (weakref.ref(p, _forget_param(id(p))), self._weakself)
            if dist.uses_hooks:
                self._hook_fns.append(self._make_hooks(p, index))
                self._hooks.append(p.register_hook(_HookTrampoline(self._weakself, index, 0)))
                self._hooks.append(p.register_post_accumulate_grad_hook(_HookTrampoline(self._weakself, index, 1)))
        # float32 buffers (exact sums of bf16/fp16 micro-batch gradients); float64 for float64 models
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in unique) else torch.float32
        self._measured = measured_idx
        self._slot = {i: s for s, i in enumerate(measured_idx)}  # parameter index -> storage index
        measured = [unique[i] for i in self._measured]
        old = getattr(self, "buffers", None)
        self.buffers = make_storage(
            measured, [dist.local(p) for p in measured], self.sketch_dim, self.seed, dtype, _row_order,
            subset=len(measured) < len(unique),
        )
        if old is not None and old.kind == self.buffers.kind:  # keep the lagged coefficients across a re-installation
            self.buffers.load_state_dict(old.state_dict())
        dist.setup(self.buffers, len(self.registry), self.registry.declared, self.estimator)
        self._direct = DirectCapture(unique) if self.capture == "direct" else None

    def _check_direct(self, params: Sequence[torch.Tensor], dist: SyncStrategy) -> None:
        """Refuse ``capture="direct"`` where ``p.grad`` cannot be the task row (before anything is hooked)."""
        if dist.kind != "single":
            from .distributed import UnsupportedDistributedError

            raise UnsupportedDistributedError(
                f"capture='direct' is single-process only (detected {dist.kind}): DDP's reducer, FSDP2 and DeepSpeed "
                "read or own p.grad during the backward, where this mode points it at a task's buffer row. Use "
                "capture='hooks' (the default)"
            )
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        odd = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype != dtype})
        if odd:
            raise ValueError(
                f"capture='direct' makes p.grad a view of the {str(dtype).replace('torch.', '')} task buffers, so every "
                f"parameter must be {str(dtype).replace('torch.', '')}; got {', '.join(odd)} parameters. Use "
                "capture='hooks' (which sums bf16/fp16 gradients into float32 rows)"
            )

    def _detach(self, reason: str) -> None:
        self.remove_hooks()
        self._replaced_by = reason

    def _make_hooks(
        self, p: torch.Tensor, index: int
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor | None], Callable[[torch.Tensor], None]]:
        """The two hook functions of ``p`` (``_install`` registers them through weak trampolines), so
        that every gradient ``backward()`` accumulates into ``p.grad`` is captured.

        Two hooks per parameter, because neither alone sees exactly those gradients:

        - a tensor hook (``register_hook``) sees the gradient of each backward but also those of
          ``torch.autograd.grad(..., inputs=p)``, which never reach ``p.grad`` (gradient
          penalties, a logged gradient norm). It only parks the gradient in a one-entry slot
          (a reference, no copy; nothing at all when ``p.grad`` is ``None``, see below);
        - a post-accumulate hook (``register_post_accumulate_grad_hook``) runs only after
          autograd has accumulated into ``p.grad``, right after the tensor hook of the same
          parameter (one autograd node runs both back to back). It adds the parked gradient
          into the active task's row. When ``p.grad`` was ``None`` before this backward, the
          gradient is read from ``p.grad`` itself: parking a reference would stop autograd from
          stealing the gradient into ``p.grad`` and cost a copy on every first micro-batch.

        Non-leaf parameters (``differentiable=True`` optimizers) have no ``p.grad`` accumulation
        and no post-accumulate hook: :meth:`_check_hookable` refuses them first.
        """
        ref = weakref.ref(p)  # the hook lives on p: a strong reference would be a cycle through the wrapper
        if self.capture == "direct":
            return self._make_direct_hooks(ref, index)

        def park(grad: torch.Tensor) -> torch.Tensor | None:
            param = ref()
            row = self._active_row
            c = self.buffers.hook_scale(None if row is None or row == _DISCARD else row)
            if c != 1.0:  # lagged coefficient (sketch_dim / measure=), applied before autograd accumulates
                self._parked = (index, grad)
                return grad * c
            self._parked = (index, None if param is None or param.grad is None else grad)
            return None

        def capture(param: torch.Tensor) -> None:
            pending, self._parked = self._parked, None
            if pending is None or pending[0] != index:  # pragma: no cover - autograd runs both hooks back to back
                logger.warning("gradient of parameter %d accumulated without its tensor hook; not captured", index)
                return
            grad = param.grad if pending[1] is None else pending[1]
            if grad is not None:
                self._capture(index, grad)

        return park, capture

    def _make_direct_hooks(
        self, ref: weakref.ref, index: int
    ) -> tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], None]]:
        """``capture="direct"``: the tensor hook points ``p.grad`` at the active row's slice (``None``
        on the row's first gradient of the step) so that autograd accumulates into the row; the
        post-accumulate hook copies a gradient that was not accumulated in place and puts the
        placeholder back (``balancedmix/direct.py``)."""

        def park(grad: torch.Tensor) -> None:
            param = ref()
            direct = self._direct
            if param is None or direct is None:
                return None
            buf = self.buffers
            row = self._active_row
            if row is None:
                row = buf.row(_UNTAGGED)  # sorts last: allocating it moves no task row
            self._parked = (index, row)
            direct.park(index, param, buf.view(row, index), buf.written(row, index))
            return None

        def capture(param: torch.Tensor) -> None:
            pending, self._parked = self._parked, None
            direct = self._direct
            if pending is None or pending[0] != index or direct is None:  # pragma: no cover - back to back
                logger.warning("gradient of parameter %d accumulated without its tensor hook; not captured", index)
                return
            buf = self.buffers
            row = pending[1]
            grad = direct.capture(index, param, buf.view(row, index))
            if grad is not None:
                with torch.no_grad():
                    buf.store(row, index, grad.detach())

        return park, capture

    @staticmethod
    def _check_hookable(params: Sequence[torch.Tensor]) -> None:
        """Refuse parameters whose accumulated gradients the hooks cannot see, before hooking any."""
        for i, p in enumerate(params):
            if not p.is_leaf:
                raise ValueError(
                    f"trainable parameter {i} (shape {tuple(p.shape)}) is not a leaf tensor (an optimizer built with "
                    "differentiable=True over non-leaf tensors, or a tensor with retain_grad()?). balancedmix captures gradients where backward() "
                    "accumulates them into p.grad, which non-leaf tensors do not have, and each in-place update "
                    "gives them a new autograd node, so hooks would go stale after the first step. Wrap an "
                    "optimizer over leaf parameters (differentiable=False), or use the plain optimizer."
                )

    def _capture(self, index: int, grad: torch.Tensor) -> None:
        """Add one parameter's accumulated gradient into the active task's row (or the untagged row)."""
        if self._grad_scaler is not None:
            self._drop_if_stale()
        slot = self._slot.get(index)
        if slot is None:
            return  # a parameter outside measure=: its gradient is scaled by the hook, not kept
        row = self._active_row
        if row is None:
            row = self.buffers.row(_UNTAGGED)
        elif row == _DISCARD:
            return  # a task block whose label failed (multi-process: raised collectively at step())
        if self._amp_token is None and self._grad_scaler is not None:
            self._amp_token = self._scaler_token()
        # detach: with backward(create_graph=True) the gradient carries a graph; the buffer holds values only
        with torch.no_grad():
            self.buffers.add(row, slot, grad.detach())

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the wrapper then sees no gradient).

        Not needed before discarding a wrapper: the hooks hold it weakly and are removed when it
        is collected, and a new wrapper built on the same parameters replaces it.
        """
        for h in self._hooks:
            h.remove()
        self._hooks.clear()  # in place: the finalizer holds this list
        if self._direct is not None:  # capture="direct": no placeholder may outlive the hooks that manage it
            self._direct.clear(self._params)
        for p in self._params:  # the parameters are free for another wrapper (no replacement warning)
            entry = _OWNERS.get(id(p))
            if entry is not None and entry[1]() is self:
                del _OWNERS[id(p)]

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

        ``batch_or_name`` is a task name, a task index (``int``, ``numpy.int64``, a one-element
        tensor; with a key ``task_key``) or a batch (resolved with ``task_key``; a batch mixing
        tasks raises :class:`~balancedmix.tasks.MixedTaskBatchError` — use :meth:`backward`).
        Each block counts as one micro-batch of that task. Yields the task name.

        In a multi-process run a label error (unknown task, mixed batch, missing key) is not
        raised here, where it would leave the other ranks waiting in a collective: the block runs
        with its gradient left out of the task buffers, and ``step()`` raises the error on every
        rank, naming the rank(s) where it happened.
        """
        if self._in_context:
            raise RuntimeError("opt.task(...) blocks cannot be nested")
        if self._grad_scaler is not None:
            self._drop_if_stale()
        if not self._microbatches:  # first block of a step: one O(#parameter tensors) check per step
            self._check_parameters("the first task() block of the step")
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
        if self._direct is not None:
            self._direct.clear(self._params)  # placeholders hold no data: None, whatever set_to_none says
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grad_left = None
        self._reset()

    def _reset(self) -> None:
        self.buffers.reset()
        self._microbatches = {}
        self._row_counts = {}
        self._synced = None
        self._parked = None
        self._amp_token = None
        self._amp_scale = None
        if self._direct is not None:
            self._direct.reset()

    # ------------------------------------------------------------------ torch.amp.GradScaler
    def set_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Tell the wrapper which ``torch.amp.GradScaler`` scales the losses (``None`` to detach it).

        The task buffers capture what backward produces, i.e. loss-scaled gradients, while the
        scaler unscales ``p.grad`` only. With the scaler attached, ``step()`` divides the captured
        gradients by the scaler's current scale: ``grad_norm/<task>``, the method's Gram matrix
        (so ``normalize(target=...)``) and :meth:`captured_gradients` are in unscaled units,
        ``grad_scale`` is the clip factor alone and ``loss_scale`` is logged. And a step the
        scaler skips (overflow: ``scaler.step`` does not call ``step()``) leaves no stale buffers:
        the first backward or :meth:`task` block after ``scaler.update()`` drops them, whether
        the gradients were then cleared by ``opt.zero_grad()`` or ``model.zero_grad()`` (either
        flavour of ``set_to_none``). Without an attached scaler, ``GradScaler.step`` hands the
        scale over itself (see ``docs/diagnostics.md``), unless ``scaler.unscale_(opt)`` was called
        first: then ``step()`` raises, asking for this call.
        Use the usual loop::

            opt.set_grad_scaler(scaler)
            with opt.task(batch):
                scaler.scale(loss).backward()
            scaler.unscale_(opt)                      # optional: clip unscaled gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()

        ``BalancedGRPOTrainer`` attaches the accelerator's scaler itself.
        """
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"set_grad_scaler needs a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if scaler is not None and self.capture == "direct":
            raise ValueError(
                "capture='direct' does not support a GradScaler (it unscales p.grad, which holds no gradient before "
                "step() in this mode): use capture='hooks'"
            )
        self._grad_scaler = scaler
        self._amp_token = None

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The attached ``torch.amp.GradScaler`` (see :meth:`set_grad_scaler`), or ``None``."""
        return self._grad_scaler

    def _scaler_token(self) -> object:
        # GradScaler.update() replaces its per-optimizer state dict: a new object means a new iteration
        return self._grad_scaler._per_optimizer_states  # type: ignore[union-attr]

    def _drop_if_stale(self) -> None:
        """Drop the captures of an iteration whose step the GradScaler skipped (overflow)."""
        if self._amp_token is not None and self._scaler_token() is not self._amp_token:
            logger.info("GradScaler skipped the optimizer step (inf/NaN gradients); dropping its captured gradients")
            self._reset()

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by GradScaler.step
        # Without an attached scaler, ask GradScaler.step to always call step() and hand over the
        # loss scale and the inf flag (``grad_scale`` / ``found_inf`` attributes), so a skipped step
        # still drops its buffers and the buffers' scale is known. With one attached, keep the
        # plain protocol (the scaler unscales p.grad and skips step() on overflow), which is what
        # accelerate's ``step_was_skipped`` (the HF Trainer's LR scheduler) relies on.
        return self._grad_scaler is None

    def _amp_begin(self) -> bool:
        """``GradScaler.step`` protocol for an unattached wrapper. Returns whether to step.

        Called with ``found_inf`` set: overflow → drop the captures and skip (no inner step, the
        step count unchanged, as the plain protocol never calls ``step()``). Else, with
        ``grad_scale`` set (``unscale_`` not called), unscale ``p.grad`` exactly as the scaler
        would and remember the scale for the buffers; with ``grad_scale`` unset (the user
        called ``scaler.unscale_``) the scale is unknown: refuse, naming :meth:`set_grad_scaler`.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None or self._grad_scaler is not None:
            return True
        grad_scale = getattr(self, "grad_scale", None)
        if float(found_inf) > 0:
            self._reset()
            self._diagnostics = {"step": float(self.num_steps), "amp_skipped": 1.0}
            if grad_scale is not None:
                self._diagnostics["loss_scale"] = float(grad_scale)
            logger.info("GradScaler found inf/NaN gradients: step %d skipped, captured gradients dropped", self.num_steps)
            return False
        if grad_scale is None:
            # the scaler deletes these after step() returns, not when it raises; the captures are
            # kept, so that set_grad_scaler(scaler) and a second scaler.step(opt) finish the step
            del self.found_inf, self.grad_scale
            raise RuntimeError(
                "a torch.amp.GradScaler unscaled the gradients (scaler.unscale_(opt)) before stepping this "
                "BalancedOptimizer, which does not know the loss scale: the task gradients it captured are "
                "loss-scaled. Attach the scaler once with opt.set_grad_scaler(scaler) (with accelerate: "
                "opt.set_grad_scaler(accelerator.scaler)). Parameters were not updated."
            )
        # multi-process: agree on the step first (DDP sync="buffers" rebuilds p.grad from the
        # loss-scaled buffers); the unscale below then applies to the global gradient
        self.synchronize()
        inv = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in self._params:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, _), grads in groups.items():
            dummy = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, dummy, inv.to(device))
        self._amp_scale = float(grad_scale)
        return True

    def _loss_unit(self) -> float:
        """``1 / loss scale`` of the attached GradScaler (1.0 without one, disabled or never used)."""
        if self._amp_scale is not None:
            return 1.0 / self._amp_scale
        sc = self._grad_scaler
        if sc is None or not sc.is_enabled() or sc._scale is None:
            return 1.0
        return 1.0 / sc.get_scale()

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
        self._check_parameters("synchronize()/step()")
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

        ``closure`` (a function that zeroes the gradients, runs the backward(s) — in
        :meth:`task` blocks to be attributed, otherwise they count as untagged — and returns the
        loss) is evaluated once by the wrapper, which corrects ``p.grad`` from it, and is then
        passed to the inner ``step``: an optimizer that evaluates it once (SGD, Adam...) gets that
        first result; one that evaluates it again (LBFGS) gets, at every later evaluation, the
        gradients of that evaluation only, corrected with the *same* task coefficients (the
        method runs once per step, at the step's starting point, so the direction is the gradient
        of one fixed objective ``Σ_t c_t L_t``). :meth:`diagnostics` describe the first
        evaluation and add ``closure_evaluations``. See ``docs/optimizers.md``.
        """
        if self._dist.engine_driven:
            # DeepSpeed ZeRO calls the inner optimizer through this wrapper once per parameter group;
            # the balancing already ran in the pre-step hook on ZeRO's step() (see distributed/deepspeed.py)
            return self.optimizer.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._amp_begin():  # a GradScaler found inf/NaN: skip the step (see set_grad_scaler)
            return loss
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            pre_hook(self, (), {})
        self._step_coef = {}
        try:
            run_inner = self._prepare_step()
        finally:
            self._reset()
        self._grad_left = None
        if run_inner:
            if closure is None:
                self.optimizer.step()
                self._grad_left = self._diagnostics.get("grad_norm/update")
            else:
                evaluate, calls = self._inner_closure(closure, loss)
                self.optimizer.step(evaluate)
                self._diagnostics["closure_evaluations"] = float(max(calls[0], 1))
        elif closure is not None:
            self._diagnostics["closure_evaluations"] = 1.0
        self.num_steps += 1
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, (), {})
        if self.on_step is not None:
            self.on_step(dict(self._diagnostics))
        return loss

    def _inner_closure(self, closure: Callable[[], Any], first_loss: Any) -> tuple[Callable[[], Any], list[int]]:
        """The closure handed to the inner step, and its call counter.

        Its first call returns the evaluation :meth:`step` already made (``p.grad`` holds its
        corrected gradient); every later call starts from empty task buffers, evaluates
        ``closure`` and corrects ``p.grad`` with the coefficients of the step's first evaluation,
        leaving :meth:`diagnostics` as they were.
        """
        calls = [0]
        frozen = dict(self._step_coef)

        def evaluate() -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return first_loss
            self._reset()
            with torch.enable_grad():
                out = closure()
            saved = self._diagnostics
            self._frozen_coef = frozen
            try:
                with torch.no_grad():
                    self._prepare_step()
            finally:
                self._frozen_coef = None
                self._diagnostics = saved
                self._reset()
            return out

        return evaluate, calls

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
        if self._pending():
            raise RuntimeError("cannot re-bind the BalancedOptimizer in the middle of a step (gradients captured)")
        self._install(params, strategy)

    def _prepare_step(self) -> bool:
        """Everything before the inner step. Returns whether to run the inner step."""
        buf = self.buffers
        self._unit = self._loss_unit()
        self.synchronize()
        assert self._synced is not None
        rows = self._synced.rows
        direct = self._direct
        if direct is not None:
            problem = direct.check(self._params)
            if problem is not None:
                direct.clear(self._params)
                raise GradientMismatchError(
                    f"capture='direct': {problem}. Parameters and optimizer state were not updated; call zero_grad() "
                    "after every step() and do not clear or assign p.grad in the middle of a step."
                )
        if not rows:
            self._diagnostics = {"step": float(self.num_steps), "buffer_bytes": float(buf.nbytes)}
            if any(self._params[i].grad is not None for i in self._measured) and self.method_name != "sum":
                raise GradientMismatchError(
                    "step() found gradients in p.grad but no backward was captured since the last step; "
                    + (
                        "p.grad most likely still holds the previous step's gradient (zero_grad() was not called "
                        "after it). "
                        if self._grad_left is not None
                        else ""
                    )
                    + "Gradients from before the last step, from before the BalancedOptimizer was created or "
                    f"written by hand cannot be corrected by method {self.method_name!r}. Call zero_grad() after "
                    "every step() and before the first backward."
                )
            return True
        n = len(buf.keys)
        if direct is None:
            row_gram, grad_dots, grad_sq = self._row_stats()
        else:  # p.grad = Σ_r B_r over this step's rows (the others hold stale data), written with the Gram's pass
            used = torch.zeros(n, dtype=torch.float64)
            used[rows] = 1.0
            row_gram = buf.gram_and_sum(used, direct.materialize(self._params))
            grad_dots, grad_sq = torch.zeros(n, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        applied = buf.applied()  # coefficient each row carries in p.grad now (lagged: the previous step's)
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
        if bool(torch.all(applied == 1.0)):
            total_sq = float(gram_ext.sum())
            total_dot = float(agg.sum(0) @ grad_dots)
        else:  # p.grad = s · Σ_r a_r B_r (lagged coefficients a applied by the hooks)
            a_ext = torch.tensor([float(applied[g[0]]) for g in groups], dtype=torch.float64)
            total_sq = float(stats.combined_sqnorm(gram_ext, a_ext))
            total_dot = float((agg.T @ a_ext) @ grad_dots)

        # ---- p.grad = s · total? (uniform rescale: clipping or AMP unscale)
        if direct is not None:
            scale = 1.0  # nothing can rescale p.grad before step() in this mode (its placeholder refuses)
        elif total_sq > 0:
            scale = total_dot / total_sq
            cos2 = (total_dot * total_dot) / (total_sq * grad_sq_f) if grad_sq_f > 0 else 0.0
            if 1.0 - cos2 > self.mismatch_tol:
                raise GradientMismatchError(self._mismatch_message(cos2, grad_sq_f, total_dot, total_sq))
        else:
            scale = 1.0
            if grad_sq_f > 0:
                raise GradientMismatchError(
                    "the captured task gradients are all zero but p.grad is not; gradients were produced outside "
                    "the wrapper's hooks. Parameters were not updated."
                )

        coef, coef_ext = self._coefficients(gram_ext, names)
        row_coef = torch.ones(n, dtype=torch.float64)
        for t_i, members in enumerate(groups[:k]):
            row_coef[members] = float(coef[t_i])
        # exact: p.grad rewritten now; sketch: coef kept for the next step's hooks. Either way the
        # coefficients of this step's update come back (what update shares and norms describe).
        # exact with capture="direct": p.grad holds Σ_r B_r since the Gram's pass, corrected like the hooks' total
        in_update = buf.combine(row_coef, scale * self._unit, self._local_grads())
        update_ext = torch.tensor([float(in_update[g[0]]) for g in groups], dtype=torch.float64)

        self._diagnostics = self._compute_diagnostics(
            names, task_ids, task_rows, untagged_row, row_gram, gram_ext, update_ext, scale, grad_sq_f
        )
        if buf.lagged:
            for i, name in enumerate(names):
                self._diagnostics[f"coef_next/{name}"] = float(coef[i])
        if len(self._measured) < len(self._params):
            self._diagnostics["measured_numel"] = float(sum(self._params[i].numel() for i in self._measured))
        if not k:
            self._untagged_only()
        return True

    def _local_grads(self) -> list[torch.Tensor | None]:
        """Each measured parameter's rank-local gradient (FSDP2: the local shard, sharing p.grad's storage)."""
        return [None if p.grad is None else self._dist.local(p.grad) for p in (self._params[i] for i in self._measured)]

    def _untagged_only(self) -> None:
        """Every gradient of the step was untagged: say so in the diagnostics, warn once."""
        self._diagnostics["untagged_only"] = 1.0
        if self._warned_untagged or self._frozen_coef is not None:
            return
        self._warned_untagged = True
        message = (
            f"step {self.num_steps}: every gradient of the step was captured outside an opt.task(...) block "
            f"('untagged'), so no per-task figure was measured"
            + ("" if self.method_name == "sum" else f" and method {self.method_name!r} corrected nothing")
            + ". "
            "Run loss.backward() inside the `with opt.task(...):` block (a backward after the block has closed is "
            "untagged), or use opt.backward({task: loss}). Diagnostics carry untagged_only = 1 for such steps; "
            "this warning is shown once."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=5)  # the caller of step() (past no_grad)

    def _mismatch_message(self, cos2: float, grad_sq: float, total_dot: float, total_sq: float) -> str:
        """Why ``p.grad`` is not a uniform rescale of the captured total ``C``: the likely cause first.

        ``‖p.grad − C‖`` equal to the norm the previous step left in ``p.grad`` means that
        gradient is still there (no ``zero_grad()``); ``‖p.grad‖ > ‖C‖`` means gradient reached
        ``p.grad`` past the hooks; otherwise ``p.grad`` lost or changed part of ``C``.
        """
        head = f"p.grad is not a uniform rescale of the captured task gradients (cos² = {cos2:.6f}): "
        tail = " Parameters and optimizer state were not updated; call zero_grad() and continue."
        residual = math.sqrt(max(grad_sq - 2.0 * total_dot + total_sq, 0.0))
        left = self._grad_left
        if left is not None and left > 0 and abs(residual - left) <= 1e-2 * left:
            return head + (
                f"p.grad still holds the previous step's gradient (‖p.grad − captured‖ = {residual:.6g} = the norm "
                "left by the last step): zero_grad() was not called after the previous step, so p.grad accumulated "
                "across steps. Call opt.zero_grad() (or model.zero_grad()) after every step()." + tail
            )
        if grad_sq > total_sq * (1.0 + 1e-3):
            return head + (
                f"p.grad holds gradient the wrapper's hooks did not capture (‖p.grad‖ = {math.sqrt(grad_sq):.6g} > "
                f"‖captured‖ = {math.sqrt(total_sq):.6g}): most likely zero_grad() was not called after the previous "
                "step (or before the first backward), or p.grad was written by hand." + tail
            )
        return head + (
            "p.grad was changed between backward and step by something other than a uniform rescale (per-element "
            "clipping such as clip_grad_value_, manual edits) or zeroed mid-step without zero_grad() on the optimizer "
            "(e.g. model.zero_grad() between micro-batches)." + tail
        )

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
        if k and self._frozen_coef is not None:  # a closure re-evaluation: the step's coefficients
            coef = torch.tensor([self._frozen_coef.get(name, 1.0) for name in names], dtype=torch.float64)
        elif k:
            ctx = MethodContext(tasks=tuple(names), step=self.num_steps, generator=self.generator)
            coef = check_coefficients(self.method(gram_ext[:k, :k].clone(), ctx), names, self.method_name)
            self._step_coef.update(zip(names, coef.tolist()))
        else:
            coef = torch.zeros(0, dtype=torch.float64)
        return coef, torch.cat([coef, torch.ones(gram_ext.shape[0] - k, dtype=torch.float64)])

    def _row_stats(self, with_grads: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gram of all rows ``[n, n]``, their dot products with ``p.grad`` ``[n]`` and ``‖p.grad‖²``.

        Asked of the storage (exact rows: chunked float32 products summed in float64; sketches:
        the same figures in the sketch space), made global under FSDP2 (exact: the local shards'
        products are summed; sketch: the shards' sketches are summed first, ``additive_stats``),
        then put in unscaled units under a GradScaler.
        """
        buf = self.buffers
        grads = self._local_grads() if with_grads else None
        if buf.additive_stats:
            row_gram, grad_dots, grad_sq = buf.row_stats(grads)
            self._dist.reduce_stats(row_gram, grad_dots, grad_sq)  # FSDP2: sums of local shard products
        else:
            row_gram, grad_dots, grad_sq = buf.row_stats(grads, self._dist.reduce_partial)
        if self._unit != 1.0:  # loss-scaled buffers (GradScaler): report and correct in unscaled units
            row_gram *= self._unit * self._unit
            grad_dots *= self._unit
        return row_gram, grad_dots, grad_sq

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
            if self._direct is not None:
                self._direct.clear(self._params)
            raise NonFiniteGradientError(
                f"NaN/Inf gradient in task(s) {bad} at step {self.num_steps}; parameters and optimizer state were not "
                "changed. Call zero_grad() and continue, or use nonfinite='skip_task' / 'skip_step'.",
                bad,
            )
        logger.warning("step %d: NaN/Inf gradient in task(s) %s; policy %s", self.num_steps, bad, self.nonfinite)
        good_ids = [t for t in task_ids if self.registry.name(t) not in bad]
        good_names = [self.registry.name(t) for t in good_ids]
        self._step_coef.update((name, 0.0) for name in bad if name != UNTAGGED)
        if self.nonfinite == "skip_step" or not good_ids:
            # skip_task with no finite task left is no step at all (not a step on a zero or
            # untagged-only gradient, which would still move AdamW's moments and parameters)
            buf.zero_rows(bad_rows)
            for p in self._params:
                p.grad = None
            self._diagnostics["step_skipped"] = 1.0
            return False
        self._diagnostics["step_skipped"] = 0.0
        # skip_task: rebuild p.grad from the finite tasks with the method's coefficients (scale 1: a
        # clip of a NaN total is NaN, so no scale can be recovered from p.grad).
        buf.zero_rows(bad_rows)
        n = len(buf.keys)
        row_gram, no_dots, no_sq = self._row_stats(with_grads=False)
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
        grads = self._direct.materialize(self._params) if self._direct is not None else self._local_grads()
        buf.combine(weights, self._unit, grads, rebuild=True)
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
        if self._grad_scaler is not None or self._amp_scale is not None:
            out["loss_scale"] = 1.0 / self._unit
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
        out.update(self._standard_errors(names, task_ids, task_rows, untagged_row, row_gram, gram_ext, coef_ext))
        out["buffer_bytes"] = float(self.buffers.nbytes)
        if self._dist.world_size > 1 and self._synced is not None:
            out["buffer_bytes"] = self._synced.extra.get("buffer_bytes_max", out["buffer_bytes"])
            out["comm_bytes"] = float(self._synced.comm_bytes + self._dist.stats_bytes)
        return out

    def _standard_errors(
        self,
        names: list[str],
        task_ids: list[int],
        task_rows: dict[int, list[int]],
        untagged_row: int | None,
        row_gram: torch.Tensor,
        gram_ext: torch.Tensor,
        coef_ext: torch.Tensor,
    ) -> dict[str, float]:
        """``*_se/<task>`` keys: the storage's standard error of each figure (none for exact rows).

        Sketch: closed forms of the delta method with the CountSketch covariance
        (:func:`~balancedmix.sketch.figure_standard_errors`) on the task Gram, and the SE of the
        halves' inner product for the split-half estimate.
        """
        buf = self.buffers
        k = len(names)
        errs = buf.figure_errors(gram_ext, coef_ext, k)
        if errs is None:
            return {}
        norm_se, share_se, cos_se = errs
        labels = names + ([UNTAGGED] if untagged_row is not None else [])
        out: dict[str, float] = {"sketch_dim": float(self.sketch_dim or 0)}
        for i, name in enumerate(labels):
            out[f"grad_norm_se/{name}"] = float(norm_se[i])
            out[f"update_share_se/{name}"] = float(share_se[i])
        for i in range(k):
            for j in range(i + 1, k):
                out[f"cos_se/{names[i]}/{names[j]}"] = float(cos_se[i, j])
        if self.estimator == "split":
            for t, name in zip(task_ids, names):
                members = task_rows[t]
                if len(members) != 2:
                    continue
                a, b = members
                n_a, n_b = self._row_counts.get(a, 0), self._row_counts.get(b, 0)
                if n_a < 1 or n_b < 1:
                    continue
                se = buf.entry_error(row_gram, a, b)
                if se is not None:
                    out[f"grad_sqnorm_unbiased_se/{name}"] = (n_a + n_b) ** 2 / (n_a * n_b) * se
        return out

    def captured_gradients(self) -> dict[str, torch.Tensor]:
        """Copies of the gradients captured since the last step, per task (halves summed).

        Returns ``{task: flat float32 tensor [P]}`` in the order of the optimizer's trainable
        parameters (with ``measure=``: of the measured ones only), with an ``"untagged"`` entry
        for backwards run outside :meth:`task`. For inspection and tests; ``step()`` consumes the
        buffers without copying them. Sketch mode keeps no gradients: ``RuntimeError``.
        """
        buf = self.buffers
        if not buf.holds_gradients:
            raise RuntimeError(
                "sketch mode (sketch_dim) keeps no task gradients, only their sketches: captured_gradients() needs "
                "exact mode (sketch_dim=None)"
            )
        rows = buf.finish()
        unit = self._loss_unit()
        out: dict[str, torch.Tensor] = {}
        for r in rows:
            key = buf.keys[r]
            name = UNTAGGED if key == _UNTAGGED else self.registry.name(key[1])
            if name in out:
                out[name] += buf.data[r]
            else:
                out[name] = buf.data[r].clone()
        if unit != 1.0:
            for t in out.values():
                t.mul_(unit)
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
        ``num_microbatches/<task>``, ``buffer_bytes``, ``step``; with a ``torch.amp.GradScaler``
        ``loss_scale`` (every figure above is in unscaled units) and ``amp_skipped`` (see
        :meth:`set_grad_scaler`); when they apply, ``nonfinite/<task>`` and ``step_skipped``
        (NaN/Inf policies), ``untagged_only`` (every gradient was captured outside :meth:`task`:
        nothing measured per task, nothing corrected) and ``closure_evaluations``
        (``step(closure)``). Tasks absent from the step have only ``num_microbatches/<task> = 0``.
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
            "storage": self.buffers.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`: the inner optimizer's state, then the task registry, step
        count, generator and method state.

        Raises :class:`~balancedmix.tasks.TaskError` (saved task list differs from the declared
        one, or holds an invalid name) or the method's error for its state before anything is
        changed, the inner optimizer included. A state dict without the ``"balancedmix"`` entry
        (a plain optimizer's) loads the inner state only, with a warning.
        """
        sd = dict(state_dict)
        own = sd.pop("balancedmix", None)
        if own is not None:  # check the wrapper's part first: a mismatch must leave the inner state as it was
            copy.deepcopy(self.registry).load_state_dict(own["tasks"])
            if own.get("method") is not None and hasattr(self.method, "load_state_dict"):
                copy.deepcopy(self.method).load_state_dict(own["method"])
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
        storage = own.get("storage")
        if storage is not None:
            if storage.get("kind") == self.buffers.kind:
                self.buffers.load_state_dict(storage)  # sketch mode: the lagged coefficients
            else:
                logger.warning(
                    "state dict was saved in %s mode, loading into %s mode: lagged coefficients start at 1",
                    storage.get("kind"), self.buffers.kind,
                )
