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

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import torch

from . import stats

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
    "Normalize",
    "PCGrad",
    "MGDA",
    "CAGrad",
    "IMTLG",
    "UPGrad",
    "pcgrad_matrix",
    "pcgrad_orders",
    "ZERO_REL",
    "mgda_weights",
    "cagrad_weights",
    "imtl_g_weights",
    "upgrad_weights",
    "dual_cone_weights",
    "nnls_gram",
    "check_coefficients",
    "collapse_projection",
]

logger = logging.getLogger(__name__)


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


# ====================================================================== shared numerics
#
# Every method below works on the K×K Gram matrix alone. The solvers run in numpy float64 on
# the CPU: for K ≤ 16 a numpy call costs about a microsecond where a torch call costs ten, and
# the methods run once per optimizer step.

#: A task whose gradient norm is at most ``ZERO_REL`` times the largest task norm of the step
#: counts as a zero gradient in ``mgda``, ``cagrad``, ``upgrad`` and ``imtl_g``: it is removed
#: before the method runs and gets coefficient 0 (see ``docs/methods.md``).
ZERO_REL = 1e-12


def _gram_array(gram: torch.Tensor, method: str) -> np.ndarray:
    """Validate a Gram matrix and return it as a symmetric float64 numpy array ``[K, K]``."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"method {method}: gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"method {method}: gram must be a square [K, K] matrix, got shape {tuple(gram.shape)}")
    g = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(g).all():
        raise ValueError(f"method {method}: gram holds NaN/Inf")
    g = 0.5 * (g + g.T)
    if (np.diagonal(g) < 0).any():
        raise ValueError(f"method {method}: gram has a negative diagonal entry (squared norm): {np.diagonal(g).tolist()}")
    return g


def _nonzero(g: np.ndarray) -> np.ndarray:
    """Mask of the tasks whose norm exceeds ``ZERO_REL`` × the largest norm (``[K]`` bool)."""
    d = np.diagonal(g)
    top = d.max() if d.size else 0.0
    return d > max(top * ZERO_REL * ZERO_REL, 0.0)


def _restrict(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gram of the non-zero tasks divided by its largest diagonal entry, and their indices."""
    idx = np.flatnonzero(_nonzero(g))
    sub = g[np.ix_(idx, idx)]
    if idx.size:
        sub = sub / np.diagonal(sub).max()
    return sub, idx


def _expand(values: np.ndarray, idx: np.ndarray, k: int) -> torch.Tensor:
    out = np.zeros(k)
    out[idx] = values
    return torch.from_numpy(out)


def _lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least-squares solve of the symmetric PSD system ``a x = b`` after Jacobi equilibration
    (so the singular-value cutoff is relative to each variable's own scale)."""
    d = np.sqrt(np.diagonal(a))
    d = np.where(d > 0, d, 1.0)
    y = np.linalg.lstsq(a / np.outer(d, d), b / d, rcond=1e-13)[0]
    return y / d


def nnls_gram(h: np.ndarray, f: np.ndarray, tol: float | None = None, max_iter: int | None = None) -> np.ndarray:
    """See :func:`_nnls_gram`; returns ``x`` only."""
    return _nnls_gram(h, f, tol, max_iter)[0]


def _nnls_gram(
    h: np.ndarray, f: np.ndarray, tol: float | None = None, max_iter: int | None = None
) -> tuple[np.ndarray, bool]:
    """Solve ``min_x ½ xᵀ h x − fᵀ x`` subject to ``x ≥ 0`` (``h`` symmetric PSD ``[n, n]``).

    This is non-negative least squares ``min_{x≥0} ||A x − b||²`` written with ``h = AᵀA`` and
    ``f = Aᵀb`` only, solved by the Lawson–Hanson active-set method (exact: it ends on the KKT
    point of the final passive set, solved by a least-squares solve on that sub-block). ``tol``
    is the threshold on the negative gradient ``f − h x`` below which no variable is freed
    (default: per variable, ``1e-13 (|f_j| + Σ_l |h_jl| x_l)``, the rounding error of computing
    that gradient entry, so tasks of very different scales are handled alike). Returns ``x`` and
    whether the method converged (``False``: iteration limit, ``x`` is the last feasible point).
    """
    h = np.asarray(h, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    n = f.shape[0]
    x = np.zeros(n)
    if n == 0:
        return x, True
    abs_h = np.abs(h)
    abs_f = np.abs(f)
    if max_iter is None:
        max_iter = 20 * n + 20
    passive = np.zeros(n, dtype=bool)
    grad = f.copy()
    blocked = -1  # a variable freed and dropped at once (numerical tie): not freed again right away
    iters = 0
    while True:
        threshold = tol if tol is not None else 1e-13 * (abs_f + abs_h @ x) + 1e-300
        cand = ~passive & (grad > threshold)
        if blocked >= 0:
            cand[blocked] = False
        if not cand.any():
            break
        j = int(np.argmax(np.where(cand, grad, -np.inf)))
        passive[j] = True
        moved = False
        while True:
            iters += 1
            if iters > max_iter:
                logger.debug("nnls_gram: iteration limit %d reached (n=%d); returning the current feasible point", max_iter, n)
                return x, False
            idx = np.flatnonzero(passive)
            s = np.zeros(n)
            s[idx] = _lstsq(h[np.ix_(idx, idx)], f[idx])
            if (s[idx] > 0).all():
                x = s
                moved = True
                break
            neg = idx[s[idx] <= 0]
            den = x[neg] - s[neg]
            ratio = np.where(den > 0, x[neg] / np.where(den > 0, den, 1.0), 0.0)
            alpha = float(ratio.min())
            if alpha > 0:
                moved = True
            x = x + alpha * (s - x)
            passive &= x > 0
            x[~passive] = 0.0
            if not passive.any():
                break
        blocked = -1 if moved else j
        grad = f - h @ x
    return x, True


def _min_norm_hull(g: np.ndarray) -> np.ndarray:
    """Weights ``α`` (on the simplex) of the min-norm point of the convex hull of K vectors.

    ``min_{α ≥ 0, Σα = 1} αᵀ g α`` equals the non-negative least-squares problem
    ``min_{β ≥ 0} ||[A; 1ᵀ] β − [0; 1]||²`` up to ``α = β / Σβ``: with ``β = sα`` its value is
    ``s² q + (s − 1)²``, minimised at ``s = 1/(1 + q)`` to ``q/(1 + q)``, increasing in
    ``q = αᵀ g α``. In Gram form ``h = g + 11ᵀ``, ``f = 1``.
    """
    k = g.shape[0]
    if k == 0:
        return np.zeros(0)
    diag = np.diagonal(g)
    if diag.max() <= 0:
        return np.full(k, 1.0 / k)
    # Scale by the smallest non-zero squared norm: the optimum q = αᵀgα is then ≤ 1, so the
    # added 11ᵀ is not swamped by the Gram near the optimum. When norms span many decades the
    # large block can then lose the 11ᵀ term to rounding and the active set cycle: retry with
    # the largest norm as scale and keep the better point.
    best, best_q = np.full(k, 1.0 / k), math.inf
    for scale in (diag[diag > 0].min(), diag.max()):
        beta, converged = _nnls_gram(g / scale + 1.0, np.ones(k))
        total = beta.sum()
        if total > 0:  # always for a PSD g (β = e_j/(1+g_jj) already beats 0)
            alpha = beta / total
            q = float(alpha @ g @ alpha)
            if q < best_q:
                best, best_q = alpha, q
        if converged:
            break
    return best


# ====================================================================== normalize


@register_method("normalize")
class Normalize:
    """Every task contributes to the update with the same magnitude.

    ``c_t = T / n̄_t`` where ``n̄_t`` is the task's gradient norm (its EMA when ``beta > 0``,
    tracked per task name) and the target ``T``:

    - ``"mean"`` (default): the mean of ``n̄`` over the tasks of the step with a non-zero
      gradient, so every contribution ``||c_t G_t||`` equals the mean task norm (with
      ``beta = 0``) and ``Σ_t ||c_t G_t|| = Σ_t ||G_t||``;
    - ``"sum"``: the equal-magnitude combination ``Σ_t G_t / n̄_t`` rescaled to the norm of the
      plain summed gradient ``||Σ_t G_t||`` (the step size of ``method="sum"``); 0 when the
      normalized gradients cancel (``||Σ_t G_t / n̄_t||² ≤ 1e-20 Σ_t (n_t / n̄_t)²``);
    - a positive float: ``||c_t G_t|| = T`` (e.g. ``1.0``: sum of unit task gradients).

    A task whose current norm is ``≤ eps`` (absolute, in gradient units) gets ``c_t = 0`` and
    leaves its EMA untouched, so a zero gradient never causes a division by zero. The EMA
    ``n̄_t ← beta n̄_t + (1 − beta) n_t`` starts at the first non-zero norm seen; tasks absent
    from a step keep their EMA. ``state_dict()`` holds the EMAs by task name.
    """

    def __init__(self, target: str | float = "mean", beta: float = 0.0, eps: float = 1e-12) -> None:
        if isinstance(target, str):
            if target not in ("mean", "sum"):
                raise ValueError(f"normalize: target must be 'mean', 'sum' or a positive float, got {target!r}")
        else:
            target = float(target)
            if not (math.isfinite(target) and target > 0):
                raise ValueError(f"normalize: a numeric target must be positive and finite, got {target}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"normalize: beta must be in [0, 1), got {beta}")
        if not (math.isfinite(float(eps)) and float(eps) >= 0):
            raise ValueError(f"normalize: eps must be a finite number >= 0, got {eps}")
        self.target = target
        self.beta = float(beta)
        self.eps = float(eps)
        self.ema: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"Normalize(target={self.target!r}, beta={self.beta}, eps={self.eps})"

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        g = _gram_array(gram, "normalize")
        k = g.shape[0]
        if len(ctx.tasks) != k:
            raise ValueError(f"normalize: gram is {k}x{k} but ctx names {len(ctx.tasks)} tasks {list(ctx.tasks)}")
        norms = np.sqrt(np.diagonal(g))
        nz = norms > self.eps
        smoothed = np.zeros(k)
        for i in np.flatnonzero(nz):
            name = ctx.tasks[i]
            value = stats.ema(self.ema.get(name), float(norms[i]), self.beta)
            self.ema[name] = value
            smoothed[i] = value
        coef = np.zeros(k)
        if not nz.any():
            return torch.from_numpy(coef)
        inv = np.zeros(k)
        inv[nz] = 1.0 / smoothed[nz]
        if self.target == "mean":
            coef = inv * smoothed[nz].mean()
        elif self.target == "sum":
            plain = float(g.sum())
            combined = float(inv @ g @ inv)
            reference = float(((inv * norms) ** 2).sum())
            if combined > 1e-20 * reference and plain > 0:
                coef = inv * math.sqrt(plain / combined)
        else:
            coef = inv * float(self.target)
        return torch.from_numpy(coef)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": dict(self.ema)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ema = state.get("ema")
        if not isinstance(ema, Mapping):
            raise ValueError(f"normalize: state must hold an 'ema' mapping task -> norm, got {type(ema).__name__}")
        loaded: dict[str, float] = {}
        for name, value in ema.items():
            v = float(value)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"normalize: EMA norm {v} for task {name!r} is not a positive finite number")
            loaded[str(name)] = v
        self.ema = loaded


# ====================================================================== pcgrad


def pcgrad_matrix(gram: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad's projected gradients as a coefficient matrix (Yu et al. 2020, Algorithm 1).

    Args:
        gram: ``[K, K]`` Gram matrix of the task gradients.
        orders: ``[K, K]`` integer tensor; row ``i`` is the order (a permutation of ``0..K-1``)
            in which task ``i``'s gradient is projected on the others (its own index is skipped).

    Returns:
        ``W`` ``[K, K]`` float64 with ``g̃_i = Σ_j W[i, j] G_j``: starting from ``g̃_i = G_i``,
        for ``j`` in ``orders[i]``, ``j ≠ i``: if ``<g̃_i, G_j> < 0`` then
        ``g̃_i ← g̃_i − <g̃_i, G_j> / ||G_j||² · G_j``. A zero ``G_j`` is never projected on.
        The K rows are processed together, one position of the orders at a time.
    """
    g = _gram_array(gram, "pcgrad")
    k = g.shape[0]
    order = np.asarray(orders.detach().cpu().numpy() if isinstance(orders, torch.Tensor) else orders, dtype=np.int64)
    if order.shape != (k, k) or (np.sort(order, axis=1) != np.arange(k)).any():
        raise ValueError(f"pcgrad: orders must be a [{k}, {k}] tensor whose rows are permutations of 0..{k - 1}")
    w = np.eye(k)
    rows = np.arange(k)
    diag = np.diagonal(g)
    for pos in range(k):
        j = order[:, pos]
        inner = np.einsum("il,li->i", w, g[:, j])  # <g̃_i, G_{j_i}>
        conflict = (inner < 0) & (j != rows) & (diag[j] > 0)
        step = np.where(conflict, inner / np.where(diag[j] > 0, diag[j], 1.0), 0.0)
        w[rows, j] -= step
    return torch.from_numpy(w)


def pcgrad_orders(k: int, generator: torch.Generator) -> torch.Tensor:
    """The ``[K, K]`` random orders PCGrad uses: ``K`` calls of ``torch.randperm(K, generator=...)``
    (row ``i`` for task ``i``), so a run is reproducible from the optimizer's seeded generator."""
    if k == 0:
        return torch.zeros(0, 0, dtype=torch.long)
    return torch.stack([torch.randperm(k, generator=generator) for _ in range(k)])


@register_method("pcgrad")
class PCGrad:
    """Projecting conflicting gradients (Yu et al. 2020): ``G = Σ_i g̃_i`` (see :func:`pcgrad_matrix`).

    Each step draws, for every task, a random order of the other tasks from ``ctx.generator``
    (reproducible; the optimizer saves the generator in its ``state_dict``). Projection happens
    only on conflict (negative inner product), so without conflicts ``c = 1`` (the plain sum).
    """

    def __repr__(self) -> str:
        return "PCGrad()"

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        k = gram.shape[0]
        return collapse_projection(pcgrad_matrix(gram, pcgrad_orders(k, ctx.generator)))


# ====================================================================== mgda


def mgda_weights(gram: torch.Tensor) -> torch.Tensor:
    """MGDA's weights: the min-norm point ``Σ α_t G_t`` of the convex hull (Désidéri 2012;
    Sener & Koltun 2018), solved exactly (active set, :func:`nnls_gram`). ``[K, K] -> [K]``.

    Zero-gradient tasks (see :data:`ZERO_REL`) are left out and get ``α = 0``; if every task is
    zero, ``α = 1/K``. The weights sum to 1 (a mean-scale update).
    """
    g = _gram_array(gram, "mgda")
    k = g.shape[0]
    sub, idx = _restrict(g)
    if idx.size == 0:
        return torch.full((k,), 1.0 / k if k else 0.0, dtype=torch.float64)
    return _expand(_min_norm_hull(sub), idx, k)


@register_method("mgda")
class MGDA:
    """Multiple-gradient descent: the min-norm element of the convex hull of the task gradients."""

    def __repr__(self) -> str:
        return "MGDA()"

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        return mgda_weights(gram)


# ====================================================================== cagrad


#: CAGrad: an optimum with ``||g_w|| ≤ _PARETO_REL ×`` the largest task norm counts as ``g_w = 0``.
_PARETO_REL = 1e-6


def cagrad_weights(gram: torch.Tensor, c: float = 0.5, rescale: bool = False) -> torch.Tensor:
    """CAGrad's coefficients (Liu et al. 2021, Algorithm 1). ``[K, K] -> [K]``.

    With ``g0`` the mean gradient and ``r = c ||g0||``: ``w* = argmin_{w ∈ Δ} <g_w, g0> + r ||g_w||``
    (``g_w = Σ w_t G_t``), then ``d = g0 + r g_w / ||g_w||``, i.e.
    ``c_t = 1/K + r w*_t / ||g_w||`` (divided by ``1 + c²`` when ``rescale``, as the authors'
    code does by default). The dual is solved exactly: for ``λ > 0``,
    ``w(λ) = argmin_{w∈Δ} <g_w, g0> + r/(2λ) ||g_w||²`` is the min-norm point of the hull of
    ``G_t + (λ/r) g0`` (an active-set solve), and the optimum is the ``λ`` with
    ``||g_{w(λ)}|| = λ`` (monotone, bracketed by the MGDA norm and the largest task norm; found
    by safeguarded regula falsi to 1e-13 relative).

    Zero-gradient tasks are left out (coefficient 0; ``K`` counts the others). If ``g0 = 0`` or
    ``c = 0`` the result is the mean (``1/K``). If the optimum has ``g_w = 0`` (the origin lies in
    the hull and no direction improves every task) the coefficients are all 0, as in torchjd.
    """
    if not (math.isfinite(float(c)) and float(c) >= 0):
        raise ValueError(f"cagrad: c must be a finite number >= 0, got {c}")
    g = _gram_array(gram, "cagrad")
    k_all = g.shape[0]
    sub, idx = _restrict(g)
    k = idx.size
    if k == 0:
        return torch.full((k_all,), 1.0 / k_all if k_all else 0.0, dtype=torch.float64)
    a = sub.mean(axis=1)  # <G_t, g0>
    g0sq = float(sub.mean())  # ||g0||²
    base = np.full(k, 1.0 / k)
    r = float(c) * math.sqrt(max(g0sq, 0.0))
    if r <= 0 or g0sq <= 1e-24:
        return _expand(base, idx, k_all)

    def solve(lam: float) -> tuple[np.ndarray, float]:
        t = lam / r  # 1/μ
        shifted = sub + t * (a[:, None] + a[None, :]) + (t * t) * g0sq
        w = _min_norm_hull(shifted)
        return w, math.sqrt(max(float(w @ sub @ w), 0.0))

    top = math.sqrt(float(np.diagonal(sub).max()))  # = 1 after _restrict's scaling
    alpha = _min_norm_hull(sub)
    # ||g_w|| comes from wᵀ gram w, so it is known to ~1e-8 × top only: below _PARETO_REL the
    # optimum is taken as g_w = 0 (the origin is, to that precision, in the hull).
    m = math.sqrt(max(float(alpha @ sub @ alpha), 0.0))  # ||g_w|| >= m on the simplex
    low = max(m, _PARETO_REL * top)
    high = top
    w_low, q_low = solve(low)
    f_low = q_low - low
    w, q = w_low, q_low
    if f_low <= 0:
        if m < _PARETO_REL * top:  # the root is at λ ≤ 1e-6 top: g_w = 0, Pareto-stationary
            return torch.zeros(k_all, dtype=torch.float64)
        # else the root is λ = m (ρ(m) >= 0 exactly; <= 0 only by rounding)
    else:
        w_high, q_high = solve(high)
        f_high = q_high - high
        w, q = (w_high, q_high) if f_high >= 0 else (w_low, q_low)
        if f_high < 0:
            side = 0
            tol = 1e-13 * top
            for _ in range(200):
                lam = high - f_high * (high - low) / (f_high - f_low)
                if not low < lam < high:
                    lam = 0.5 * (low + high)
                w, q = solve(lam)
                f = q - lam
                if abs(f) <= tol or high - low <= tol:
                    break
                if f > 0:
                    low, f_low = lam, f
                    if side == 1:
                        f_high *= 0.5
                    side = 1
                else:
                    high, f_high = lam, f
                    if side == -1:
                        f_low *= 0.5
                    side = -1
    if q <= _PARETO_REL * top:
        return torch.zeros(k_all, dtype=torch.float64)
    coef = base + (r / q) * w
    if rescale:
        coef = coef / (1.0 + float(c) ** 2)
    return _expand(coef, idx, k_all)


@register_method("cagrad")
class CAGrad:
    """Conflict-averse gradient descent (Liu et al. 2021); ``c`` ≥ 0 is the radius factor
    (``c = 0`` is the mean). ``rescale=True`` divides by ``1 + c²`` like the authors' code."""

    def __init__(self, c: float = 0.5, rescale: bool = False) -> None:
        if not (math.isfinite(float(c)) and float(c) >= 0):
            raise ValueError(f"cagrad: c must be a finite number >= 0, got {c}")
        self.c = float(c)
        self.rescale = bool(rescale)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, rescale={self.rescale})"

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        return cagrad_weights(gram, self.c, self.rescale)


# ====================================================================== imtl_g


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021), generalised to dependent gradients as in torchjd:
    ``v = gram⁺ n`` (``n_t = ||G_t||``), ``w = v / Σ v``. ``[K, K] -> [K]``.

    ``G = Σ w_t G_t`` has the same projection ``<G, G_t/||G_t||>`` on every task's unit gradient
    and ``Σ w = 1``. When ``|Σ v| ≤ 1e-12`` (Gram scaled to a unit largest norm: e.g. two
    opposite gradients) no such update exists with ``Σ w = 1`` and the weights are 0.
    Zero-gradient tasks get weight 0.
    """
    g = _gram_array(gram, "imtl_g")
    k = g.shape[0]
    sub, idx = _restrict(g)
    if idx.size == 0:
        return torch.zeros(k, dtype=torch.float64)
    # Solve on the unit-norm Gram U = N⁻¹ gram N⁻¹ (N = diag of norms): gram⁺ n = N⁻¹ U⁺ 1 when
    # gram is invertible, and U's conditioning does not suffer from tasks of very different
    # scales (a 1e6 norm ratio makes gram's pseudo-inverse cut-off depend on the task order).
    # Rank-deficient (parallel or dependent gradients): torchjd's generalisation gram⁺ n.
    norms = np.sqrt(np.diagonal(sub))
    unit = sub / np.outer(norms, norms)
    if np.linalg.matrix_rank(unit, tol=1e-10) == len(norms):
        v = np.linalg.solve(unit, np.ones(len(norms))) / norms
    else:
        st = torch.from_numpy(sub)
        v = (torch.linalg.pinv(st) @ torch.diagonal(st).sqrt()).numpy()
    total = float(v.sum())
    if abs(total) <= 1e-12:
        return torch.zeros(k, dtype=torch.float64)
    return _expand(v / total, idx, k)


@register_method("imtl_g")
class IMTLG:
    """Impartial MTL, gradient part: equal projections on every unit task gradient, closed form."""

    def __repr__(self) -> str:
        return "IMTLG()"

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        return imtl_g_weights(gram)


# ====================================================================== upgrad
#
# UPGrad solves one small non-negative QP per task: ``v = argmin_{v ≥ u} vᵀ Γ v``. On Grams whose
# task gradients are dependent up to float32 rounding (condition ~1e13) the Gram-form active-set
# method of :func:`nnls_gram` solves its sub-systems to ~1e-3 only, its active set cycles and it
# stops at its iteration limit on a point that violates the optimality conditions (16 % off the
# exact update in ``tests/test_upgrad_solver.py``). The solve below has three stages:
#
# 1. Lawson–Hanson on an explicit factor ``R`` of the unit-norm Gram (``RᵀR = Γ̃``, from its
#    eigendecomposition): the sub-problems are least-squares solves on columns of ``R``, whose
#    condition number is the square root of the Gram's. Anti-cycling: Dantzig's rule, switching to
#    Bland's rule if a passive set repeats; a variable that enters and leaves without the point
#    moving is not eligible again until it moves; the blocking variable leaves exactly.
# 2. If that point fails the optimality check (rounding-level tolerance), the problem is solved
#    again robustly: by enumerating every support (``K ≤ 10``) or by accelerated projected
#    gradient, keeping the better point.
# 3. The point is then refined against the Gram itself (its entries taken as exact): an active
#    set continuation from that point's support whose linear solves are corrected by iterative
#    refinement with residuals in extended precision (``numpy.longdouble``; plain float64 on
#    platforms without it). It is kept only when it satisfies the optimality conditions of the
#    original problem; it makes the result independent of the task order and, where the
#    sub-blocks are not singular to working precision, equal to the exact answer for the given
#    Gram (an ill-conditioned Gram moves the exact answer by up to ~1e-4 of the gradients' size
#    for a one-ulp change of its entries: nothing from the Gram alone is more precise than that).
#    Skipped on a numerically singular Gram (an eigenvalue of the unit Gram ≤ K·eps of the
#    largest: exactly dependent gradients), whose entries carry rounding noise in the dependent
#    directions that an exact solve would follow.
#
# If stage 2 still does not satisfy the optimality check, a warning is logged (once per set of
# tasks) and the best point found is used.

#: Largest problem size for which a non-converged active-set solve falls back to enumerating
#: every support (``2ⁿ − 1`` small least-squares solves; 1023 for ``n = 10``).
_ENUMERATE_MAX = 10

#: Type of the refinement's residuals, and its unit roundoff: 1.1e-19 where ``numpy.longdouble``
#: is the x87 80-bit format (x86-64 Linux), 2.2e-16 where it is float64 (Windows, ARM macOS).
_LD: Any = np.longdouble
_EPS_LD = float(np.finfo(_LD).eps)

#: Task sets (or sizes, without names) already warned about a non-converged UPGrad solve.
_UPGRAD_WARNED: set[tuple[Any, ...]] = set()


def _psd_factor(h: np.ndarray) -> tuple[np.ndarray, bool]:
    """``R`` (``[n, n]``) with ``RᵀR`` the positive semi-definite part of the symmetric ``h``, and
    whether ``h`` is numerically singular.

    Eigenvalues at or below ``n·eps`` times the largest are rounding noise of the Gram (exactly
    dependent gradients give such eigenvalues, of either sign): they are set to 0, so those
    directions count as exactly dependent; negative ones (a Gram accumulated in float32) too.
    """
    lam, q = np.linalg.eigh(0.5 * (h + h.T))
    floor = h.shape[0] * np.finfo(np.float64).eps * max(float(lam[-1]), 0.0) if lam.size else 0.0
    singular = bool(lam.size and lam[0] <= floor)
    lam = np.where(lam > floor, lam, 0.0)
    return np.sqrt(lam)[:, None] * q.T, singular


def _ls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares ``min ||a y − b||`` (columns equilibrated, relative singular-value cutoff)."""
    d = np.linalg.norm(a, axis=0)
    d = np.where(d > 0, d, 1.0)
    return np.linalg.lstsq(a / d, b, rcond=1e-13)[0] / d


def _kkt_tol(a: np.ndarray, b: np.ndarray, x: np.ndarray, cn: np.ndarray) -> np.ndarray:
    """Per variable, a bound on the rounding error of the gradient entry ``a_jᵀ(b − a x)``."""
    return 1e-12 * cn * (np.linalg.norm(b) + cn @ np.abs(x)) + 1e-300


def _kkt_ok(a: np.ndarray, b: np.ndarray, x: np.ndarray, cn: np.ndarray) -> bool:
    """Whether ``x`` is optimal for ``min_{x≥0} ||a x − b||²`` up to rounding: ``x ≥ 0``, no
    variable would decrease the objective when freed (``w_j ≤ tol_j`` with ``w = aᵀ(b − a x)``)
    and the free variables are stationary (``|w_j| ≤ tol_j`` where ``x_j > 0``)."""
    w = a.T @ (b - a @ x)
    tol = _kkt_tol(a, b, x, cn)
    free = x > 0
    return bool((x >= 0).all() and (w <= tol).all() and (np.abs(w[free]) <= tol[free]).all())


def _lawson_hanson(a: np.ndarray, b: np.ndarray, max_iter: int) -> tuple[np.ndarray, bool]:
    """Lawson–Hanson active-set NNLS ``min_{x≥0} ||a x − b||²`` on an explicit ``a`` (``[m, n]``).

    The entering variable has the largest normalised gradient (Dantzig's rule). In exact
    arithmetic the objective decreases strictly from one passive set to the next, so none
    repeats; a repeat (rounding) switches to Bland's rule (the lowest eligible index enters) and a
    repeat under Bland's rule stops. A variable that enters and leaves without the point moving (a
    numerical tie) is not eligible again until the point moves. Returns ``x`` (always feasible)
    and whether it ended with no eligible variable (``False``: cycle or iteration limit).
    """
    n = a.shape[1]
    cn = np.linalg.norm(a, axis=0)
    safe_cn = np.where(cn > 0, cn, 1.0)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)
    seen: set[bytes] = set()
    bland = False
    iters = 0
    while True:
        w = a.T @ (b - a @ x)
        cand = ~passive & ~blocked & (cn > 0) & (w > _kkt_tol(a, b, x, cn))
        if not cand.any():
            return x, True
        j = int(np.flatnonzero(cand)[0]) if bland else int(np.argmax(np.where(cand, w / safe_cn, -np.inf)))
        passive[j] = True
        moved = False
        while True:
            iters += 1
            if iters > max_iter:
                return x, False
            idx = np.flatnonzero(passive)
            s = np.zeros(n)
            s[idx] = _ls(a[:, idx], b)
            if (s[idx] > 0).all():
                moved = moved or not np.array_equal(s, x)
                x = s
                break
            neg = idx[s[idx] <= 0]
            den = x[neg] - s[neg]
            ratio = np.where(den > 0, x[neg] / np.where(den > 0, den, 1.0), 0.0)
            at = int(np.argmin(ratio))
            alpha = float(ratio[at])
            moved = moved or alpha > 0
            x = x + alpha * (s - x)
            x[neg[at]] = 0.0  # the blocking variable leaves exactly (rounding can leave 1e-17)
            passive &= x > 0
            x[~passive] = 0.0
            if not passive.any():
                break
        if not moved:
            blocked[j] = True
            continue
        blocked[:] = False
        key = passive.tobytes()
        if key in seen:
            if bland:
                return x, False
            bland = True
            seen.clear()
        seen.add(key)


def _nnls_enumerate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact NNLS by enumeration: the least-squares solution on every support whose coefficients
    are all ≥ 0, keeping the smallest residual (an optimum whose support columns are linearly
    independent always exists, and it is one of them). ``2ⁿ − 1`` solves: small ``n`` only."""
    n = a.shape[1]
    best, best_res = np.zeros(n), float(b @ b)
    for mask in range(1, 1 << n):
        idx = np.flatnonzero([(mask >> j) & 1 for j in range(n)])
        y = _ls(a[:, idx], b)
        if (y < 0).any():
            continue
        r = b - a[:, idx] @ y
        res = float(r @ r)
        if res < best_res:
            best = np.zeros(n)
            best[idx] = y
            best_res = res
    return best


def _projected_gradient(a: np.ndarray, b: np.ndarray, x0: np.ndarray, cn: np.ndarray, iters: int = 20000) -> np.ndarray:
    """Accelerated projected gradient (FISTA with adaptive restart) from ``x0``: converges for any
    ``a`` (singular included); stops early once :func:`_kkt_ok` holds."""
    lip = float(np.linalg.norm(a, 2) ** 2) or 1.0
    x = y = x0.copy()
    t = 1.0
    for it in range(iters):
        x_new = np.maximum(y + a.T @ (b - a @ y) / lip, 0.0)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        if (y - x_new) @ (x_new - x) > 0:  # restart when the momentum points uphill
            t_new, y = 1.0, x_new
        else:
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
        if it % 50 == 49 and _kkt_ok(a, b, x, cn):
            break
    return x


def _nnls_factor(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, bool]:
    """``argmin_{x≥0} ||a x − b||²`` (stages 1–2 above). Returns ``x`` and whether it satisfies
    the optimality conditions up to rounding (:func:`_kkt_ok`)."""
    n = a.shape[1]
    if n == 0:
        return np.zeros(0), True
    cn = np.linalg.norm(a, axis=0)
    x, _ = _lawson_hanson(a, b, max_iter=30 * n + 30)
    if _kkt_ok(a, b, x, cn):
        return x, True
    other = _nnls_enumerate(a, b) if n <= _ENUMERATE_MAX else _projected_gradient(a, b, x, cn)
    if np.sum((a @ other - b) ** 2) < np.sum((a @ x - b) ** 2):
        x = other
    return x, _kkt_ok(a, b, x, cn)


def _refined_solve(g: np.ndarray, gx: np.ndarray, free: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """``v`` with ``(g v)_free = 0`` and ``v`` unchanged elsewhere, by an equilibrated LU solve on
    ``g[free, free]`` plus iterative refinement with residuals in ``gx`` (``g`` in extended
    precision). ``None`` when the block is singular to working precision (the refinement does not
    bring the residual to rounding level)."""
    idx = np.flatnonzero(free)
    sub = g[np.ix_(idx, idx)]
    d = np.sqrt(np.diagonal(sub))
    if (d <= 0).any():
        return None
    scaled = sub / np.outer(d, d)
    out = v.astype(_LD)
    out[idx] = 0
    best, best_norm = None, math.inf
    for _ in range(8):
        res = -(gx[idx] @ out)  # −(g v)_free, accurately
        norm = float(np.max(np.abs(res)))
        if norm >= best_norm:
            break
        best, best_norm = out.copy(), norm
        try:
            step = np.linalg.solve(scaled, (res / d).astype(np.float64)) / d
        except np.linalg.LinAlgError:
            return None
        if not np.isfinite(step).all():
            return None
        out[idx] += step
    if best is None:
        return None
    scale = float(np.max(np.abs(g[idx]) @ np.abs(best.astype(np.float64))))
    return best if best_norm <= 1e4 * _EPS_LD * scale else None


def _dual_cone_refine(g: np.ndarray, u: np.ndarray, v0: np.ndarray) -> np.ndarray | None:
    """Stage 3: ``argmin_{v ≥ u} vᵀ g v`` by an active-set continuation from ``v0`` on ``g`` itself
    (entries exact, refined solves). Returns ``v`` when it satisfies the optimality conditions of
    this problem up to extended-precision rounding, else ``None``."""
    k = g.shape[0]
    gx = g.astype(_LD)
    ux = u.astype(_LD)
    v = np.maximum(v0.astype(_LD), ux)
    free = v > ux
    abs_g = np.abs(g)
    seen: set[bytes] = set()
    for _ in range(4 * k + 4):
        key = free.tobytes()
        if key in seen:
            return None
        seen.add(key)
        if free.any():
            s = _refined_solve(g, gx, free, v)
            if s is None:
                return None
            low = free & (s <= ux)
            if low.any():  # step back towards v to the first bound, release it
                idx = np.flatnonzero(low)
                den = v[idx] - s[idx]
                ratio = np.where(den > 0, (v[idx] - ux[idx]) / np.where(den > 0, den, 1), 0)
                at = int(np.argmin(ratio))
                v = v + ratio[at] * (s - v)
                v[idx[at]] = ux[idx[at]]
                free &= v > ux
                v[~free] = ux[~free]
                continue
            v = s
        grad = gx @ v  # <update, G_t>: must be >= 0 where v_t = u_t, 0 where v_t > u_t
        tol = 64 * _EPS_LD * (abs_g @ np.abs(v.astype(np.float64))) + 1e-300
        enter = ~free & (grad < -tol)
        if not enter.any():
            if (np.abs(grad[free]) > 200 * tol[free]).any():
                return None
            return v.astype(np.float64)
        free[int(np.argmin(np.where(enter, grad / np.sqrt(np.maximum(np.diagonal(g), 1e-300)), np.inf)))] = True
    return None


def _dual_cone(
    g: np.ndarray, u: np.ndarray, factor: tuple[np.ndarray, bool] | None = None
) -> tuple[np.ndarray, bool]:
    """``argmin_{v ≥ u} vᵀ g v`` for a PSD ``g`` (``[k, k]``, any scale), stages 1–3. ``factor``:
    :func:`_psd_factor` of the unit-norm ``g`` if already computed. Returns ``v`` and whether the
    optimality conditions hold (stage 2 or 3).

    Stage 3 is skipped on a numerically singular Gram: its entries then carry rounding noise in
    the dependent directions that an exact solve would follow (with coefficients ~1e8), while the
    gradients themselves are dependent; stage 1's factor treats those directions as dependent.
    """
    d = np.sqrt(np.clip(np.diagonal(g), 0.0, None))
    d = np.where(d > 0, d, 1.0)
    r, singular = _psd_factor(g / np.outer(d, d)) if factor is None else factor
    ud = u * d
    x, ok = _nnls_factor(r, -(r @ ud))
    v0 = (ud + x) / d
    if not singular:
        v = _dual_cone_refine(g, u, v0)
        if v is not None:
            return v, True
    return v0, ok


def _warn_not_converged(method: str, tasks: Sequence[str] | None, k: int, detail: str) -> None:
    key = (method, tuple(tasks) if tasks is not None else k)
    if key in _UPGRAD_WARNED:
        return
    _UPGRAD_WARNED.add(key)
    who = f"tasks {list(tasks)}" if tasks is not None else f"{k} tasks"
    logger.warning(
        "%s: the QP solve did not reach its optimality conditions for %s (%s); using the best point "
        "found. The task gradients are nearly linearly dependent (ill-conditioned Gram). "
        "Warned once per set of tasks.",
        method,
        who,
        detail,
    )


def dual_cone_weights(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights ``v`` of the projection of ``Σ u_t G_t`` onto the dual cone ``{x: <x, G_t> ≥ 0 ∀t}``.

    By Quinton & Rey (2024, Prop. 1) the projection is ``Σ v_t G_t`` with
    ``v = argmin_{v ≥ u} vᵀ gram v``: a non-negative least-squares problem in ``x = v − u``,
    solved robustly (anti-cycling active set on a factor of the Gram, a fallback solve, then
    refinement against the Gram itself; see ``docs/methods.md``). Logs a warning if the result
    still misses its optimality conditions. Arrays: ``gram`` ``[K, K]`` (symmetric PSD), ``u``
    ``[K]``.
    """
    g = np.asarray(gram, dtype=np.float64)
    g = 0.5 * (g + g.T)
    u = np.asarray(u, dtype=np.float64)
    v, ok = _dual_cone(g, u)
    if not ok:
        _warn_not_converged("dual_cone_weights", None, len(u), "K = %d" % len(u))
    return v


def _upgrad(gram: torch.Tensor, pref: torch.Tensor | Sequence[float] | None) -> tuple[torch.Tensor, bool]:
    """:func:`upgrad_weights` and whether every projection met its optimality conditions."""
    g = _gram_array(gram, "upgrad")
    k_all = g.shape[0]
    _, idx = _restrict(g)
    k = idx.size
    if k == 0:
        return torch.zeros(k_all, dtype=torch.float64), True
    if pref is None:
        p = np.full(k, 1.0 / k)
    else:
        p_all = np.asarray(pref.detach().cpu().numpy() if isinstance(pref, torch.Tensor) else pref, dtype=np.float64)
        if p_all.shape != (k_all,) or not np.isfinite(p_all).all() or (p_all < 0).any():
            raise ValueError(f"upgrad: pref must be {k_all} finite non-negative numbers, got {p_all.tolist()}")
        p = p_all[idx]
    # The dual cone of {G_t} is that of the unit gradients {G_t/||G_t||}: the active-set solve
    # runs on a factor of the unit Gram, so a tiny task's constraint <x, G_t> >= 0 is as binding
    # as a large one's; the refinement then works on the caller's Gram entries themselves.
    orig = g[np.ix_(idx, idx)]
    n = np.sqrt(np.diagonal(orig))
    factor = _psd_factor(orig / np.outer(n, n))
    total = np.zeros(k)
    converged = True
    for i in range(k):
        if p[i] == 0:
            continue
        u = np.zeros(k)
        u[i] = p[i]
        v, ok = _dual_cone(orig, u, factor)
        converged &= ok
        total += v
    return _expand(total, idx, k_all), bool(converged)


def upgrad_weights(
    gram: torch.Tensor, pref: torch.Tensor | Sequence[float] | None = None, tasks: Sequence[str] | None = None
) -> torch.Tensor:
    """UPGrad (Quinton & Rey 2024; torchjd's default aggregator). ``[K, K] -> [K]``.

    ``G = Σ_i π(p_i G_i)``, with ``π`` the projection onto the dual cone of the task gradients and
    ``p`` the preference vector (default ``1/K``: mean scale). Each ``π(p_i G_i)`` is a small QP
    on the Gram (:func:`dual_cone_weights`); the coefficients are the sum of their weights. The
    result has a non-negative inner product with every task gradient. Zero-gradient tasks are
    left out (coefficient 0, and ``K`` counts the others).

    The QPs are solved robustly, also on nearly singular Grams (see ``docs/methods.md``); if a
    solve still misses its optimality conditions, a warning naming ``tasks`` (the Gram's task
    names, when given) is logged once per set of tasks and the best point found is used.
    """
    coef, converged = _upgrad(gram, pref)
    if not converged:
        _warn_not_converged("upgrad", tasks, int(gram.shape[0]), "K = %d" % int(gram.shape[0]))
    return coef


@register_method("upgrad")
class UPGrad:
    """Unconflicting projection of gradients (Quinton & Rey 2024): the mean of every task
    gradient's projection onto the dual cone. ``pref`` (``{task: weight}``, default ``1/K``)
    replaces the mean by a weighted sum; tasks missing from ``pref`` get weight 0.

    ``converged`` is ``False`` after a step whose QP solves missed their optimality conditions
    (nearly dependent task gradients; a warning naming the tasks is then logged once per set of
    tasks), ``True`` after a normal step, ``None`` before the first."""

    def __init__(self, pref: Mapping[str, float] | None = None) -> None:
        if pref is not None:
            for name, value in pref.items():
                if not (math.isfinite(float(value)) and float(value) >= 0):
                    raise ValueError(f"upgrad: preference {value} for task {name!r} must be finite and >= 0")
        self.pref = dict(pref) if pref is not None else None
        self.converged: bool | None = None

    def __repr__(self) -> str:
        return f"UPGrad(pref={self.pref!r})"

    def __call__(self, gram: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        pref = None if self.pref is None else [float(self.pref.get(t, 0.0)) for t in ctx.tasks]
        coef, self.converged = _upgrad(gram, pref)
        if not self.converged:
            _warn_not_converged("upgrad", ctx.tasks, len(ctx.tasks), f"step {ctx.step}")
        return coef
