"""Pure tensor maths on per-task gradients and their Gram matrix.

Nothing here knows about modules, optimizers or processes. Gradients are given either as one
tensor per task (any shape, flattened) or as a list of tensors per task (one per parameter);
everything downstream of :func:`gram_matrix` works on the K×K Gram matrix alone, in float64.

Notation: ``G_t`` is task t's gradient summed over its micro-batches in the step,
``gram[i, j] = <G_i, G_j>``, ``c`` the method's coefficients, ``G = Σ_t c_t G_t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

__all__ = [
    "GradLike",
    "gram_matrix",
    "norms",
    "cosines",
    "update_shares",
    "combined_sqnorm",
    "split_half_sqnorm",
    "split_half_noise_trace",
    "noise_scale",
    "ema",
]

GradLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def _flat(g: GradLike) -> torch.Tensor:
    if isinstance(g, torch.Tensor):
        return g.detach().reshape(-1).to(torch.float64)
    if len(g) == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in g])


def gram_matrix(grads: Sequence[GradLike]) -> torch.Tensor:
    """Gram matrix ``[K, K]`` (float64) of K task gradients.

    Each gradient is a tensor or a list of per-parameter tensors; all must have the same total
    number of elements. This is the explicit reference; the optimizer computes the same matrix
    from its flat buffers with one matrix product.
    """
    flats = [_flat(g) for g in grads]
    if not flats:
        return torch.zeros(0, 0, dtype=torch.float64)
    sizes = {f.numel() for f in flats}
    if len(sizes) != 1:
        raise ValueError(f"task gradients have different numbers of elements: {sorted(sizes)}")
    mat = torch.stack(flats)
    return mat @ mat.T


def norms(gram: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each task gradient, ``sqrt(diag(gram))`` (``[K]``)."""
    return torch.diagonal(gram).clamp(min=0).sqrt()


def cosines(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix ``[K, K]``; entries involving a zero gradient are 0 (diagonal 1)."""
    n = norms(gram)
    denom = n[:, None] * n[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    cos = cos.clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


def combined_sqnorm(gram: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``||Σ_t c_t G_t||² = cᵀ gram c`` (scalar tensor)."""
    coef = coef.to(gram.dtype)
    return coef @ gram @ coef


def update_shares(gram: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
    """Each task's share of the update ``G = Σ_t c_t G_t``: ``share_t = <c_t G_t, G> / ||G||²``.

    Shares sum to 1 (they can be negative: a task pulling against the update). Returns zeros
    when ``G = 0``. ``coef`` defaults to all ones (the plain sum).
    """
    if coef is None:
        coef = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    coef = coef.to(gram.dtype)
    proj = coef * (gram @ coef)
    total = proj.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.zeros_like(proj)
    return proj / total


def split_half_sqnorm(dot_ab: float, n_a: int, n_b: int, n_total: int | None = None) -> float:
    """Unbiased estimate of ``||E G||²`` from two independent halves of a task's micro-batches.

    With micro-batch gradients ``g_i`` i.i.d. with mean ``μ``, halves ``A = Σ_{i∈A} g_i`` (``n_a``
    micro-batches) and ``B`` (``n_b``), ``E<A/n_a, B/n_b> = ||μ||²``, whereas the raw
    ``||(A+B)/n||²`` is biased up by ``tr(Σ)/n``. The estimate is scaled to the step's summed
    gradient ``G = A + B`` of ``n_total = n_a + n_b`` micro-batches: ``n² <A, B> / (n_a n_b)``.
    It can be negative (pure noise); callers clip at 0 before taking a square root.
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"split-half estimate needs at least one micro-batch per half, got {n_a} and {n_b}")
    n = n_a + n_b if n_total is None else n_total
    return float(dot_ab) * n * n / (n_a * n_b)


def split_half_noise_trace(sq_a: float, sq_b: float, dot_ab: float, n_a: int, n_b: int) -> float:
    """Unbiased ``tr(Σ)`` of one micro-batch's gradient from the two halves.

    ``E||A/n_a - B/n_b||² = tr(Σ) (1/n_a + 1/n_b)``, with ``sq_a = ||A||²``, ``sq_b = ||B||²``.
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"noise trace needs at least one micro-batch per half, got {n_a} and {n_b}")
    diff = sq_a / n_a**2 + sq_b / n_b**2 - 2.0 * dot_ab / (n_a * n_b)
    return diff / (1.0 / n_a + 1.0 / n_b)


def noise_scale(trace: float, mean_sqnorm: float) -> float:
    """Simple gradient-noise scale ``B_simple = tr(Σ) / ||μ||²`` (McCandlish et al. 2018).

    In units of micro-batches when ``trace`` is the per-micro-batch covariance trace and
    ``mean_sqnorm`` the squared norm of the mean micro-batch gradient. ``inf`` when the mean
    estimate is not positive.
    """
    if mean_sqnorm <= 0:
        return math.inf
    return trace / mean_sqnorm


def ema(previous: float | None, value: float, beta: float) -> float:
    """Exponential moving average ``beta * previous + (1 - beta) * value``; starts at ``value``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
    if previous is None:
        return value
    return beta * previous + (1.0 - beta) * value
