"""Gradient corrections as pure functions of the task Gram matrix.

Every method maps the K×K Gram matrix ``gram[i, j] = <G_i, G_j>`` of the present tasks'
gradients to a coefficient vector ``c`` (shape ``[K]``); the combined update is then
``G = Σ_t c_t G_t``. Because a method only ever sees K×K scalars, it is exact whatever the
gradients' layout (flat buffers, DDP, FSDP2 shards after one all-reduce of the Gram).

A method is any callable ``method(gram, ctx) -> coefficients``:

- ``gram``: ``torch.float64`` tensor ``[K, K]``, symmetric positive semi-definite, finite.
- ``ctx``: a :class:`MethodContext` (task names, optimizer step, a seeded generator).
- returns a ``torch.float64`` tensor ``[K]``.

A method with state (EMA, ...) is a class with ``state_dict()`` / ``load_state_dict()``; the
optimizer saves and restores it. Register a factory with :func:`register_method` to make it
available by name (``BalancedOptimizer(opt, method="name", **options)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import torch

__all__ = [
    "MethodContext",
    "Method",
    "MethodSpec",
    "register_method",
    "make_method",
    "available_methods",
    "sum_method",
    "mean_method",
    "Weights",
]


@dataclass(frozen=True)
class MethodContext:
    """What a method may know besides the Gram matrix.

    Attributes:
        tasks: names of the K tasks present in this step, in registry order (the Gram's order).
        step: index of the optimizer step being taken (0 for the first step).
        generator: a CPU ``torch.Generator`` owned by the optimizer, seeded by its ``seed`` and
            saved in its ``state_dict`` — use it for every random choice (PCGrad's task order).
    """

    tasks: tuple[str, ...]
    step: int
    generator: torch.Generator


@runtime_checkable
class Method(Protocol):
    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor: ...


MethodSpec = Union[str, Callable[[torch.Tensor, MethodContext], torch.Tensor]]

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: register ``factory(**options) -> Method`` under ``name``."""

    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_method(spec: MethodSpec, **options: Any) -> Method:
    """Build a method from a registered name (with options) or return a callable as is."""
    if isinstance(spec, str):
        factory = _REGISTRY.get(spec)
        if factory is None:
            raise ValueError(f"unknown method {spec!r}; available: {', '.join(available_methods())}")
        return factory(**options)
    if not callable(spec):
        raise TypeError(f"method must be a name or a callable (gram, ctx) -> coefficients, got {type(spec).__name__}")
    if options:
        raise TypeError(f"options {sorted(options)} given for a callable method; bind them in the callable itself")
    return spec  # type: ignore[return-value]


def _ones(gram: torch.Tensor) -> torch.Tensor:
    return torch.ones(gram.shape[0], dtype=torch.float64, device=gram.device)


def sum_method(gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    """Baseline: ``c_t = 1`` — the plain summed gradient (bit-identical to the plain optimizer)."""
    return _ones(gram)


def mean_method(gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    """``c_t = 1/K`` over the K tasks present in the step."""
    return _ones(gram) / max(gram.shape[0], 1)


register_method("sum")(lambda: sum_method)
register_method("mean")(lambda: mean_method)


class Weights:
    """Fixed per-task weights, or a schedule ``step -> {task: weight}``.

    A task missing from the mapping gets ``default`` (1.0 unless given; ``None`` makes a missing
    task an error). Weights must be finite; negative weights are allowed only with
    ``allow_negative=True``.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | Callable[[int], Mapping[str, float]],
        default: float | None = 1.0,
        allow_negative: bool = False,
    ) -> None:
        self.weights = weights
        self.default = default
        self.allow_negative = allow_negative

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        table = self.weights(ctx.step) if callable(self.weights) else self.weights
        out = []
        for task in ctx.tasks:
            if task in table:
                w = float(table[task])
            elif self.default is None:
                raise KeyError(f"no weight for task {task!r} at step {ctx.step}; weights cover {sorted(table)}")
            else:
                w = float(self.default)
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"weight {w} for task {task!r} is not finite")
            if w < 0 and not self.allow_negative:
                raise ValueError(f"weight {w} for task {task!r} is negative (allow_negative=False)")
            out.append(w)
        return torch.tensor(out, dtype=torch.float64, device=gram.device)


@register_method("weights")
def _weights_factory(weights: Mapping[str, float] | Callable[[int], Mapping[str, float]], **kw: Any) -> Method:
    return Weights(weights, **kw)


def collapse_projection(matrix: torch.Tensor) -> torch.Tensor:
    """Coefficients of ``Σ_i g̃_i`` when ``g̃_i = Σ_j matrix[i, j] G_j`` (``[K, K] -> [K]``)."""
    return matrix.sum(dim=0)


def check_coefficients(coef: torch.Tensor, tasks: Sequence[str], method_name: str) -> torch.Tensor:
    """Validate a method's output: shape ``[K]``, finite. Returns it as float64."""
    if not isinstance(coef, torch.Tensor):
        coef = torch.as_tensor(coef, dtype=torch.float64)
    coef = coef.detach().to(dtype=torch.float64, device="cpu")
    if coef.shape != (len(tasks),):
        raise ValueError(
            f"method {method_name} returned coefficients of shape {tuple(coef.shape)}, expected ({len(tasks)},) "
            f"for tasks {list(tasks)}"
        )
    if not torch.isfinite(coef).all():
        bad = [t for t, c in zip(tasks, coef.tolist()) if c != c or abs(c) == float("inf")]
        raise FloatingPointError(f"method {method_name} returned non-finite coefficients for tasks {bad}")
    return coef
