"""CountSketch of gradients over global parameter coordinates, and the error of its estimates.

A CountSketch ``S: R^P -> R^d`` sends coordinate ``j`` to bucket ``h(j) ∈ [0, d)`` with sign
``s(j) ∈ {±1}``: ``(S x)_b = Σ_{j: h(j)=b} s(j) x_j``. It is linear, so the sketch of a sum of
gradients is the sum of their sketches (micro-batches, shards and ranks just add), and inner
products are estimated without bias:

    E ⟨S a, S b⟩ = ⟨a, b⟩
    Cov(⟨S a, S b⟩, ⟨S c, S e⟩) = (⟨a,c⟩⟨b,e⟩ + ⟨a,e⟩⟨b,c⟩ − 2 Σ_j a_j b_j c_j e_j) / d
    Var ⟨S a, S b⟩ = (‖a‖² ‖b‖² + ⟨a,b⟩² − 2 Σ_j a_j² b_j²) / d

for fully random ``h`` and ``s`` (each coordinate's pair independent and uniform). In words: the
relative standard error of a squared norm is at most ``sqrt(2/d)`` (0.55 % at ``d = 2^16``,
0.28 % at ``2^18``), and an inner product's error is ``‖a‖ ‖b‖ sqrt((1 + cos²)/d)``.

Hash: ``(h(j), s(j))`` come from a counter-based hash of ``(key, j)``, the way a counter-based
generator (Philox, splitmix) draws the ``j``-th number of stream ``key``: coordinates fall in
fixed global blocks of ``2^20``; block ``b`` gets the key ``k_b = splitmix64(key, b)`` and its
coordinate at offset ``o`` the 32-bit word ``z = fmix32(o XOR k_b)`` (murmur3's finaliser, a
bijection with full avalanche); ``h`` and ``s`` are read from the low bits of ``z``.
Consequences:

- a coordinate's bucket and sign depend only on its *global* index ``j`` (its position in the
  concatenation of the trainable parameters in the optimizer's order) and on the key, never on
  how the parameters are split into shards, chunks or ranks: an FSDP2 shard sketches its own
  slice with the same ``h, s`` as a single process would, and the sketches add up exactly
  (up to float summation order);
- nothing of size ``P`` is stored: the hash of a chunk of coordinates is computed when the
  chunk is sketched (transient memory: one chunk of ``CHUNK`` int32 indices, 1 MiB);
- the key is re-drawn every step (``key = mix(seed, step)``), so the errors of different steps
  are independent and average out over a run instead of repeating a fixed bias of one hash.

The bucket and sign are read as one index ``i = z mod 2d`` into a transient ``[d, 2]`` buffer
(``h = i // 2``, sign ``−`` when ``i`` is odd); ``index_add_`` adds the values there unchanged
and the two columns are subtracted into the sketch: no multiplication by signs on the ``P``
values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "CountSketch",
    "CHUNK",
    "mix64",
    "shard_offset",
    "global_starts",
    "inner_product_variance",
    "gram_covariance",
    "delta_standard_errors",
    "figure_standard_errors",
]

#: coordinates hashed per chunk (a few ``CHUNK``-sized int32 tensors: 2^16 measured fastest on a CPU,
#: where the hash then runs in L2 cache; larger chunks are memory-bound, smaller ones call-bound).
CHUNK = 1 << 16

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """``splitmix64`` of a sequence of integers, as a Python int in ``[0, 2^64)`` (keys and seeds)."""
    z = 0
    for v in values:
        z = (z + (int(v) & _MASK64) + _GOLDEN) & _MASK64
        z = ((z ^ (z >> 30)) * _M1) & _MASK64
        z = ((z ^ (z >> 27)) * _M2) & _MASK64
        z ^= z >> 31
    return z


#: coordinates are grouped in fixed global blocks of ``2**BLOCK_BITS``; a block's hash key is
#: ``mix64(key, block)`` and its coordinates are hashed by their 20-bit offset in the block.
BLOCK_BITS = 20
_BLOCK = 1 << BLOCK_BITS
_F1 = 0x85EBCA6B - (1 << 32)  # murmur3 fmix32 multipliers as signed int32
_F2 = 0xC2B2AE35 - (1 << 32)


def _block_key(key: int, block: int) -> int:
    """The 32-bit key of one global block, as a signed int32 value."""
    k = mix64(key, block) & 0xFFFFFFFF
    return k - (1 << 32) if k >= 1 << 31 else k


def _hash_range(start: int, n: int, key: int, device: torch.device) -> torch.Tensor:
    """``fmix32(o XOR k_b)`` (int32) for global coordinates ``j = start .. start+n-1``.

    ``b = j >> 20`` is the coordinate's global block, ``o = j & (2^20 − 1)`` its offset in the
    block, ``k_b = mix64(key, b)`` (low 32 bits) the block's key and ``fmix32`` the murmur3
    finaliser (a bijection of 32-bit words with full avalanche). int32 arithmetic runs about
    five times faster than a 64-bit hash on a CPU. torch's ``>>`` on int32 is arithmetic; the
    masks make it the logical shift of the reference (tested against :func:`_hash_reference`).
    """
    out = torch.empty(n, dtype=torch.int32, device=device)
    tmp = torch.empty(min(n, _BLOCK), dtype=torch.int32, device=device)
    pos, j = 0, start
    while pos < n:
        block, off = j >> BLOCK_BITS, j & (_BLOCK - 1)
        m = min(n - pos, _BLOCK - off)
        z, y = out[pos : pos + m], tmp[:m]
        torch.arange(off, off + m, dtype=torch.int32, device=device, out=z)
        z.bitwise_xor_(_block_key(key, block))
        for shift, mult in ((16, _F1), (13, _F2), (16, None)):
            torch.bitwise_right_shift(z, shift, out=y)
            y.bitwise_and_((1 << (32 - shift)) - 1)
            z.bitwise_xor_(y)
            if mult is not None:
                z.mul_(mult)
        pos += m
        j += m
    return out


def _hash_reference(j: int, key: int) -> int:
    """Pure-Python hash of coordinate ``j`` (the definition :func:`_hash_range` vectorises), in ``[0, 2^32)``."""
    m32 = 0xFFFFFFFF
    z = (j & (_BLOCK - 1)) ^ (mix64(key, j >> BLOCK_BITS) & m32)
    z ^= z >> 16
    z = (z * 0x85EBCA6B) & m32
    z ^= z >> 13
    z = (z * 0xC2B2AE35) & m32
    return z ^ (z >> 16)


class CountSketch:
    """A seeded CountSketch ``R^P -> R^d`` over global coordinates.

    Args:
        dim: the sketch dimension ``d`` (an integer in ``[1, 2^30]``; a power of two hashes
            fastest and exactly uniformly, another ``d`` has a bucket bias below ``2d / 2^32``).
        seed: with the step, determines the hash; every rank must use the same.
        chunk: coordinates hashed at once (bounds the transient memory).

    Example::

        cs = CountSketch(1 << 12, seed=0)
        key = cs.key(step=0)
        a, b = torch.randn(10_000), torch.randn(10_000)
        est = cs.sketch(a, key=key) @ cs.sketch(b, key=key)      # ≈ a @ b, error ≈ ‖a‖‖b‖/64
    """

    def __init__(self, dim: int, seed: int = 0, chunk: int = CHUNK) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 1 << 30:
            raise ValueError(f"sketch dimension must be an integer in [1, 2^30], got {dim!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.dim = dim
        self.seed = int(seed)
        self.chunk = int(chunk)
        self._pow2 = dim & (dim - 1) == 0

    def __repr__(self) -> str:
        return f"CountSketch(dim={self.dim}, seed={self.seed})"

    def key(self, step: int = 0) -> int:
        """The hash key of ``step`` (a new, independent hash every step)."""
        return mix64(self.seed, step)

    def indices(self, start: int, n: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``2 h(j) + [s(j) = −1]`` for global coordinates ``j = start .. start+n-1`` (int32, ``[0, 2d)``)."""
        z = _hash_range(start, n, key, torch.device(device))
        if self._pow2:
            return z.bitwise_and_(2 * self.dim - 1)
        return torch.remainder(z, 2 * self.dim, out=z)

    def buckets_and_signs(self, start: int, n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``h(j)`` (int64) and ``s(j)`` (±1.0, float64) of coordinates ``start .. start+n-1`` (for tests)."""
        idx = self.indices(start, n, key).long()
        return idx // 2, 1.0 - 2.0 * (idx % 2).to(torch.float64)

    def add_(self, out: torch.Tensor, values: torch.Tensor, start: int, key: int, scale: float = 1.0) -> torch.Tensor:
        """``out += scale · S(x)`` where ``x`` is ``values`` (flattened) placed at global coordinates ``start ..``.

        ``out`` is a ``[d]`` floating tensor on ``values``' device; ``values`` of any floating
        dtype is accumulated in ``out.dtype``. Returns ``out``.
        """
        if out.shape != (self.dim,):
            raise ValueError(f"sketch output must have shape ({self.dim},), got {tuple(out.shape)}")
        flat = values.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            return out
        pair = torch.zeros(2 * self.dim, dtype=out.dtype, device=out.device)
        for lo in range(0, n, self.chunk):
            hi = min(lo + self.chunk, n)
            idx = self.indices(start + lo, hi - lo, key, out.device)
            pair.index_add_(0, idx, flat[lo:hi].to(out.dtype))
        folded = pair.view(self.dim, 2)
        if scale == 1.0:
            out.add_(folded[:, 0]).sub_(folded[:, 1])
        else:
            out.add_(folded[:, 0] - folded[:, 1], alpha=scale)
        return out

    def sketch(self, values: torch.Tensor, start: int = 0, key: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``S(x)`` of ``values`` placed at global coordinate ``start`` (a new ``[d]`` tensor)."""
        out = torch.zeros(self.dim, dtype=dtype, device=values.device)
        return self.add_(out, values, start, self.key(0) if key is None else key)

    def matrix(self, numel: int, key: int) -> torch.Tensor:
        """The explicit ``[d, numel]`` matrix of ``S`` on coordinates ``0 .. numel-1`` (small sizes, tests)."""
        h, s = self.buckets_and_signs(0, numel, key)
        mat = torch.zeros(self.dim, numel, dtype=torch.float64)
        mat[h, torch.arange(numel)] = s
        return mat


# ----------------------------------------------------------------------------- global coordinates
def shard_offset(t: torch.Tensor) -> int:
    """Element offset of ``t``'s local data in the parameter's flat (row-major) global layout.

    0 for a plain tensor. For an FSDP2 ``DTensor`` sharded ``Shard(0)`` on a 1-d mesh, the local
    shard holds rows ``row0 .. row0 + local_rows - 1``, i.e. global flat coordinates
    ``row0 · row_numel ..`` — contiguous, so ``offset(param) + shard_offset(p) + local index`` is
    the coordinate of a local element.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return 0
    if not isinstance(t, DTensor):
        return 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    if not all(isinstance(pl, Shard) and pl.dim == 0 for pl in placements) or t.device_mesh.ndim != 1:
        raise ValueError(f"sketch coordinates need Shard(0) placements on a 1-d mesh, got {placements}")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
    row_numel = math.prod(t.shape[1:]) if t.dim() > 1 else 1
    return int(offset[0]) * row_numel if t.dim() else 0


def global_starts(params: Sequence[torch.Tensor]) -> list[int]:
    """Global coordinate of each parameter's first *local* element (parameters in the optimizer's order).

    Parameter ``i`` starts at the sum of the global sizes of the parameters before it; a shard
    adds its :func:`shard_offset`.
    """
    starts, offset = [], 0
    for p in params:
        starts.append(offset + shard_offset(p))
        offset += p.numel()  # a DTensor's numel() is the global size
    return starts


# ----------------------------------------------------------------------------- error of the estimates
def inner_product_variance(sq_a: float, sq_b: float, dot_ab: float, dim: int, sum_sq_products: float = 0.0) -> float:
    """``Var ⟨S a, S b⟩ = (‖a‖²‖b‖² + ⟨a,b⟩² − 2 Σ_j a_j² b_j²) / d`` for a fully random CountSketch.

    ``sum_sq_products = Σ_j a_j² b_j²`` is unknown from sketches; leaving it at 0 gives an upper
    bound, tight when no few coordinates carry a large share of both vectors' mass (the case of
    gradients spread over millions of parameters). For ``a = b``: ``2(‖a‖⁴ − Σ a_j⁴)/d``.
    """
    return (sq_a * sq_b + dot_ab * dot_ab - 2.0 * sum_sq_products) / dim


def gram_covariance(gram: torch.Tensor, dim: int) -> torch.Tensor:
    """Covariance ``[R, R, R, R]`` of the sketched Gram entries, plug-in from ``gram``.

    ``Cov(Ĝ_ab, Ĝ_ce) ≈ (G_ac G_be + G_ae G_bc) / d`` (the fourth-moment term ``2 Σ_j a_j b_j c_j e_j``
    is dropped: a conservative bound for variances, negligible for spread-out gradients).
    """
    g = gram.to(torch.float64)
    return (torch.einsum("ac,be->abce", g, g) + torch.einsum("ae,bc->abce", g, g)) / dim


def delta_standard_errors(fn: Callable[[torch.Tensor], torch.Tensor], gram: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard errors of ``fn(Ĝ)`` (a vector of figures computed from a sketched Gram), delta method.

    ``Var f(Ĝ) ≈ ∇f · Cov(Ĝ) · ∇f`` with :func:`gram_covariance`, which contracts to
    ``(⟨J, G J G⟩ + ⟨J, G Jᵀ G⟩) / d`` per output (``J = ∂f/∂G``), so the ``R⁴`` covariance is
    never formed. ``gram`` is evaluated as given (plug-in). Returns a float64 vector shaped like
    ``fn(gram)`` (flattened); a zero row (an all-zero gradient) has zero error.
    """
    g = gram.detach().to(torch.float64)
    value = fn(g).reshape(-1)
    if value.numel() == 0:
        return value
    # A zero row (a task with an all-zero gradient: its sketch is exactly 0, without error) puts
    # sqrt'(0) = ∞ into the Jacobian, and a later 0·∞ = NaN spreads through any matrix product
    # (a grouping of rows) to every output. The Jacobian is taken at the Gram plus a diagonal of
    # 10⁻²⁴ of its largest entry: derivatives stay finite (and change by ~10⁻²⁴), and a zero row's
    # terms still vanish below because the covariance uses the Gram itself.
    scale = float(torch.diagonal(g).abs().max()) if g.numel() else 0.0
    eps = 1e-24 * scale if scale > 0 else 1e-300
    at = g + eps * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    jac = torch.autograd.functional.jacobian(lambda x: fn(x).reshape(-1), at)  # [n, R, R]
    jac = torch.nan_to_num(jac, nan=0.0, posinf=0.0, neginf=0.0)
    first = torch.einsum("nab,ac,nce,eb->n", jac, g, jac, g)
    second = torch.einsum("nab,ae,nce,cb->n", jac, g, jac, g)
    var = (first + second) / dim
    return var.clamp_min(0.0).sqrt()


def figure_standard_errors(
    gram: torch.Tensor, coef: torch.Tensor, k: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard errors of the diagnostics computed from a sketched Gram, in closed form.

    ``gram`` ``[m, m]`` is the Gram of the sketched task vectors (the first ``k`` tasks, then
    possibly the untagged part), ``coef`` ``[m]`` the coefficients of the update. Returns

    - the SE of each norm ``‖G_t‖``: ``sqrt(G_tt / (2d))`` (from ``Var Ĝ_tt = 2 G_tt² / d``);
    - the SE of each update share ``c_t (G c)_t / cᵀGc``: the delta method with the covariance of
      :func:`gram_covariance`, contracted as in :func:`delta_standard_errors`;
    - the SE of each cosine ``[k, k]``: ``(1 − cos²) / sqrt(d)`` (0 on the diagonal and where a
      norm is 0).

    The same figures as :func:`delta_standard_errors` gives for these functions (tested), at the
    cost of a few ``m × m`` products instead of one backward pass per figure.
    """
    g = gram.detach().to(torch.float64)
    c = coef.detach().to(g.dtype)
    m = g.shape[0]
    diag = torch.diagonal(g).clamp_min(0.0)
    norm_se = (diag / (2.0 * dim)).sqrt()
    total = float(c @ g @ c)
    if m == 0 or not math.isfinite(total) or total <= 0:
        share_se = torch.zeros(m, dtype=g.dtype)
    else:
        shares = c * (g @ c) / total
        eye = torch.eye(m, dtype=g.dtype)
        # J_t = ∂ share_t / ∂G = (c_t e_t cᵀ − share_t c cᵀ) / total
        jac = (c[:, None, None] * eye[:, :, None] * c[None, None, :] - shares[:, None, None] * torch.outer(c, c)[None]) / total
        gjg = torch.matmul(torch.matmul(g, jac), g)
        gjtg = torch.matmul(torch.matmul(g, jac.transpose(1, 2)), g)
        var = ((jac * gjg).sum((1, 2)) + (jac * gjtg).sum((1, 2))) / dim
        share_se = var.clamp_min(0.0).sqrt()
    nk = diag[:k].sqrt()
    denom = nk[:, None] * nk[None, :]
    cos = torch.where(denom > 0, g[:k, :k] / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    cos_se = torch.where(denom > 0, (1.0 - cos.clamp(-1.0, 1.0) ** 2) / math.sqrt(dim), torch.zeros_like(denom))
    cos_se.fill_diagonal_(0.0)
    return norm_se, share_se, cos_se
