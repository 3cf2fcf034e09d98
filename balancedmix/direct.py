"""``capture="direct"``: autograd accumulates each backward straight into the task's buffer row.

The default capture (``capture="hooks"``) lets ``p.grad`` accumulate the plain total, as without
the wrapper, and copies (first micro-batch of a task) or adds (later ones) each gradient into the
task's row: one extra pass over ``P`` floats per micro-batch, on top of the step's Gram. With
``capture="direct"`` the parameter's tensor hook points ``p.grad`` at the active row's slice
before autograd accumulates (``None`` on the row's first micro-batch in the step: autograd then
hands over its gradient tensor, which the post-accumulate hook copies into the row), so later
micro-batches of a task cost autograd's own in-place add and nothing else. ``step()`` then
writes ``p.grad = Σ_r c_r B_r`` from the rows (one pass) instead of checking and correcting a
plain total.

What it gives up, and how each is made loud rather than silent:

- **p.grad between the backward and ``step()``** holds no gradient: it is a shape-only
  placeholder (:class:`DirectGradPlaceholder`) whose every tensor operation raises
  :class:`DirectCaptureError` — so ``clip_grad_norm_``, a GradScaler's ``unscale_``, a logged grad
  norm or a manual edit fail with a message naming this mode instead of reading or scaling a
  wrong tensor. Where the loop clips (the HF Trainer, TRL), keep ``capture="hooks"``.
- **``sum`` is not bit-identical to the plain optimizer**: ``p.grad`` is ``Σ_t B_t`` summed task
  by task, not the plain micro-batch order (equal up to float32 rounding).
- **Single process only**: DDP's reducer, FSDP2 and DeepSpeed read or own ``p.grad`` during the
  backward; the wrapper refuses them (``UnsupportedDistributedError``).
- **float32 / float64 parameters whose dtype is the buffers'** (``p.grad`` must have the
  parameter's dtype); no ``sketch_dim``, ``measure=``, LBFGS or GradScaler.
- **``model.zero_grad()`` mid-step, a ``p.grad`` replaced by hand, or a non-zero gradient left from
  before the step** (no ``zero_grad()``) are found by the next backward's hook and raise
  :class:`~balancedmix.optimizer.GradientMismatchError` at ``step()``, parameters untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._C import DisableTorchFunctionSubclass

__all__ = ["DirectCaptureError", "DirectGradPlaceholder", "DirectCapture"]

_HARMLESS = {"__get__", "__repr__", "__format__", "size", "dim", "numel", "__len__", "__hash__", "__eq__"}


class DirectCaptureError(RuntimeError):
    """``p.grad`` was used between the backward and ``step()`` under ``capture="direct"``."""


class DirectGradPlaceholder(torch.Tensor):
    """What ``p.grad`` holds between a backward and ``step()`` with ``capture="direct"``.

    A zero-strided tensor of the parameter's shape and dtype (one element of memory) whose
    tensor operations raise :class:`DirectCaptureError`: the gradient lives in the task rows
    until ``step()`` writes the combined one. Shape, dtype and device can be read.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _HARMLESS:
            with DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise DirectCaptureError(
            f"p.grad was used ({name or func}) between the backward and step() of a BalancedOptimizer with "
            "capture='direct': in that mode autograd accumulates each task's gradient into its buffer row and "
            "p.grad holds no gradient until step() writes the combined one. Gradient clipping, GradScaler "
            "unscaling, grad-norm logging or edits of p.grad need capture='hooks' (the default)."
        )


def placeholder(p: torch.Tensor) -> torch.Tensor:
    data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
    return torch.Tensor._make_subclass(DirectGradPlaceholder, data, False)


class DirectCapture:
    """Per-parameter bookkeeping of ``capture="direct"`` (the optimizer's hooks call it).

    ``park`` runs in the parameter's tensor hook, before autograd accumulates: it checks that
    ``p.grad`` is what the mode left there and points it at the row (or ``None``). ``capture`` runs
    in the post-accumulate hook: it moves a gradient autograd did not accumulate in place (the
    row's first micro-batch, ``create_graph=True``) into the row and puts the placeholder back.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.placeholders = [placeholder(p) for p in params]
        self.seen: set[int] = set()  # parameters captured since the last reset
        self.problem: str | None = None

    def park(self, index: int, param: torch.Tensor, view: torch.Tensor, written: bool) -> None:
        cur = param.grad
        if cur is not self.placeholders[index] and self.problem is None:
            if index in self.seen:
                self.problem = (
                    "p.grad of a parameter was cleared or replaced between two backwards of the step (model.zero_grad() "
                    "or an assignment mid-step?)"
                )
            elif cur is not None and bool(cur.any()):  # zeros (zero_grad(set_to_none=False)) are harmless
                self.problem = (
                    "p.grad held a gradient before this step's first backward (zero_grad() not called after the "
                    "previous step, or p.grad written by hand)"
                )
        param.grad = view if written else None

    def capture(self, index: int, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor | None:
        """Put the placeholder back; returns the gradient to copy into the row (``None``: accumulated in place)."""
        grad = param.grad
        self.seen.add(index)
        param.grad = self.placeholders[index]
        return None if grad is view else grad

    def check(self, params: Sequence[torch.Tensor]) -> str | None:
        """At ``step()``: what went wrong since the last reset (``None``: nothing). A parameter without
        gradient this step must still have ``p.grad is None``, as the plain optimizer would see it."""
        if self.problem is None:
            for i, p in enumerate(params):
                g = p.grad
                if i not in self.seen and g is not None and g is not self.placeholders[i] and bool(g.any()):
                    self.problem = (
                        "p.grad of a parameter without gradient in this step holds a tensor (zero_grad() not called "
                        "after the previous step, or p.grad written by hand)"
                    )
                    break
        return self.problem

    def clear(self, params: Sequence[torch.Tensor]) -> None:
        """Placeholders → ``None`` (zero_grad, a skipped or failed step)."""
        for p, ph in zip(params, self.placeholders):
            if p.grad is ph:
                p.grad = None

    def materialize(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Fresh ``p.grad`` tensors (uninitialised) for the parameters captured this step; ``None`` for the others."""
        out: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            if i in self.seen:
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
                out.append(p.grad)
            else:
                out.append(None)
        return out

    def reset(self) -> None:
        self.seen = set()
        self.problem = None
