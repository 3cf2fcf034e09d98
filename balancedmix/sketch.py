"""CountSketch of gradients over global parameter coordinates, and the error of its estimates.

A CountSketch ``S: R^P -> R^d`` sends coordinate ``j`` to bucket ``h(j) ∈ [0, d)`` with sign
``s(j) ∈ {±1}``: ``(S x)_b = Σ_{j: h(j)=b} s(j) x_j``. It is linear, so the sketch of a sum of
gradients is the sum of their sketches (micro-batches, shards and ranks just add), and inner
products are estimated without bias.

The hash (**rotated blocks**). Coordinates fall in global blocks of ``d`` consecutive
coordinates: ``j = β·d + o`` (block ``β``, offset ``o ∈ [0, d)``). Each step's key draws, per
block, a rotation ``r_β ∈ [0, d)`` and a sign ``σ_β = ±1``, and one sign table ``τ`` (iid ±1,
length ``2d + m·#blocks``); with ``q = o + r_β ∈ [0, 2d)`` (the unwrapped rotated position)

    h(j) = q mod d          s(j) = σ_β · τ[q + m·β]

where ``m`` is the smallest integer ``≥ 2`` that does not divide ``d`` (3 for a power of two).
A block is therefore added as *one* contiguous ``addcmul_``: its ``d`` values, times a window of
``τ``, into positions ``r_β .. r_β + d`` of a ``2d`` scratch vector, which is folded once into the
sketch (``out += w[:d] + w[d:]``) when the row is read. No per-coordinate hash, no scatter, no
wrap inside a block (about 0.2 ns per coordinate on a CPU, 10× faster than hashing every
coordinate).

Its moments (over the key; proved in ``docs/diagnostics.md``, tested in ``tests/test_sketch.py``):

- two coordinates of one block never collide; two of different blocks collide with probability
  exactly ``1/d``, and the product of their signs has mean 0 (``σ``), so ``E ⟨S a, S b⟩ = ⟨a, b⟩``;
- two colliding coordinates never read the same ``τ`` entry, and two colliding pairs of the same
  two blocks never read the same two entries (both would need ``m`` to divide ``d``), which makes
  their sign products orthogonal, so the variance is the CountSketch one *without* the pairs
  inside a block:

      Var ⟨S a, S b⟩ = (‖a‖²‖b‖² + ⟨a,b⟩² − Σ_β (‖a_β‖²‖b_β‖² + ⟨a_β,b_β⟩²)) / d
      Cov(⟨S a, S b⟩, ⟨S c, S e⟩) = (⟨a,c⟩⟨b,e⟩ + ⟨a,e⟩⟨b,c⟩ − Σ_β (⟨a_β,c_β⟩⟨b_β,e_β⟩ + ⟨a_β,e_β⟩⟨b_β,c_β⟩)) / d

  (``a_β``: the block's slice of ``a``), at most the fully random CountSketch's
  ``(‖a‖²‖b‖² + ⟨a,b⟩² − 2 Σ_j a_j² b_j²)/d`` and 0 when ``P ≤ d`` (one block: the sketch is a
  signed permutation, exact). In words: the relative standard error of a squared norm is at most
  ``sqrt(2/d)`` (0.55 % at ``d = 2^16``, 0.28 % at ``2^18``), and an inner product's error at
  most ``‖a‖ ‖b‖ sqrt((1 + cos²)/d)``.

Consequences of hashing by the global index:

- a coordinate's bucket and sign depend only on its *global* index ``j`` (its position in the
  concatenation of the trainable parameters in the optimizer's order) and on the key, never on
  how the parameters are split into shards, chunks or ranks: an FSDP2 shard sketches its own
  slice with the same ``h, s`` as a single process would, and the sketches add up exactly
  (up to float summation order);
- nothing of size ``P`` is stored: ``τ`` and the per-block draws have ``2d + (m + 2)·P/d``
  entries (the key's draws are cached until the key changes);
- the key is re-drawn every step (``key = mix64(seed, step)``), so the errors of different steps
  are independent and average out over a run instead of repeating a fixed bias of one hash.

The draws come from counter-based hashes (the way Philox or splitmix draw the ``i``-th number of a
stream): ``τ[i]``, ``r_β`` and ``σ_β`` are read from ``fmix32(i XOR k)`` (murmur3's finaliser, a
bijection of 32-bit words with full avalanche) with a sub-key ``k`` of the step's key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "CountSketch",
    "CHUNK",
    "tau_stride",
    "mix64",
    "shard_offset",
    "global_starts",
    "inner_product_variance",
    "exact_inner_product_variance",
    "gram_covariance",
    "delta_standard_errors",
    "figure_standard_errors",
]

#: blocks per batch of the vectorised path (accelerators): its transients hold about ``CHUNK`` values
CHUNK = 1 << 22

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def mix64(*values: int) -> int:
    """``splitmix64`` of a sequence of integers, as a Python int in ``[0, 2^64)`` (keys and seeds)."""
    z = 0
    for v in values:
        z = (z + (int(v) & _MASK64) + _GOLDEN) & _MASK64
        z = ((z ^ (z >> 30)) * _M1) & _MASK64
        z = ((z ^ (z >> 27)) * _M2) & _MASK64
        z ^= z >> 31
    return z


def _fmix32(x: int) -> int:
    """murmur3's 32-bit finaliser (pure Python; the definition :func:`_fmix32_range` vectorises)."""
    z = x & _MASK32
    z ^= z >> 16
    z = (z * 0x85EBCA6B) & _MASK32
    z ^= z >> 13
    z = (z * 0xC2B2AE35) & _MASK32
    return z ^ (z >> 16)


def _fmix32_range(n: int, subkey: int) -> torch.Tensor:
    """``fmix32(i XOR subkey)`` for ``i = 0 .. n-1`` (int64 tensor on the CPU, values in ``[0, 2^32)``).

    int64 arithmetic masked to 32 bits: a product of two 32-bit values wraps modulo ``2^64``,
    whose low 32 bits are the 32-bit product (tested against :func:`_fmix32`).
    """
    if n >= 1 << 32:
        raise ValueError(f"a sketch draws at most 2^32 values per stream, asked for {n}")
    z = torch.arange(n, dtype=torch.int64).bitwise_xor_(subkey & _MASK32)
    z.bitwise_xor_(z >> 16).mul_(0x85EBCA6B).bitwise_and_(_MASK32)
    z.bitwise_xor_(z >> 13).mul_(0xC2B2AE35).bitwise_and_(_MASK32)
    return z.bitwise_xor_(z >> 16)


# sub-keys of a step's key: one independent stream per kind of draw
_TAU, _ROT_HI, _ROT_LO, _SIGN = range(4)


def tau_stride(dim: int) -> int:
    """``m``: the smallest integer ``≥ 2`` that does not divide ``dim`` (block ``β`` reads ``τ`` from ``m·β`` on).

    With ``m ∤ d`` two colliding coordinates never read the same ``τ`` entry, and two colliding
    pairs of the same two blocks never read the same two entries (``docs/diagnostics.md``): what
    keeps the variance formula exact. 3 for a power of two.
    """
    m = 2
    while dim % m == 0:
        m += 1
    return m


def max_blocks(dim: int) -> int:
    """The most blocks one key can hash: ``τ`` (``2d + m·blocks`` entries) is read from a 32-bit counter."""
    return ((1 << 32) - 2 * dim) // tau_stride(dim)


class _Draws:
    """The random draws of one key for blocks ``0 .. blocks-1``: ``τ`` (length ``2d + m·blocks``),
    rotations ``r_β`` and block signs ``σ_β``, and the piece plans made from them."""

    def __init__(self, dim: int, key: int, blocks: int) -> None:
        sub = [mix64(key, s) for s in range(4)]
        self.blocks = blocks
        self.stride = tau_stride(dim)
        self.tau = 1.0 - 2.0 * (_fmix32_range(2 * dim + self.stride * blocks, sub[_TAU]) >> 31).to(torch.float64)
        hi = _fmix32_range(blocks, sub[_ROT_HI]).bitwise_and_(0x7FFFFFFF)
        rot = torch.remainder((hi << 32) | _fmix32_range(blocks, sub[_ROT_LO]), dim)  # 63 random bits mod d
        sign = 1.0 - 2.0 * (_fmix32_range(blocks, sub[_SIGN]) >> 31).to(torch.float64)
        self.rot, self.sign = rot, sign
        self._on: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._plans: dict[tuple[int, int, int, torch.device, torch.dtype], _Plan] = {}

    def plan(self, dim: int, start: int, n: int, device: torch.device, dtype: torch.dtype) -> _Plan:
        """The pieces of coordinates ``start .. start+n-1`` (cached: the hooks sketch the same
        parameters every micro-batch of a step)."""
        key = (dim, start, n, device, dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(dim, start, n, self, self.on("tau", device, dtype))
        return plan

    def on(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tau``, ``rot`` or ``sign`` on ``device`` (in ``dtype``), copied once per key."""
        src = getattr(self, name)
        dtype = dtype or src.dtype
        t = self._on.get((name, device, dtype))
        if t is None:
            t = self._on[(name, device, dtype)] = src.to(device=device, dtype=dtype)
        return t


class _Plan:
    """How coordinates ``start .. start+n-1`` enter the ``2d`` scratch under one key: one contiguous
    segment per block they touch (scratch positions ``q = o + r_β``, never wrapped), with its ``τ``
    window and block sign, for one fused ``torch._foreach_addcmul_`` per call instead of a Python
    loop (the CPU path: one segment per parameter inside a block, one per block of a larger one,
    ~220 per micro-batch for a 10M model; the batched path: the partial blocks at a range's ends).
    Built once per range and key; the scratch slices are kept for the last scratch tensor used."""

    def __init__(self, dim: int, start: int, n: int, draws: _Draws, tau: torch.Tensor) -> None:
        self.numel = n
        self.sizes: list[int] = []
        self.bounds: list[tuple[int, int]] = []
        self.taus: list[torch.Tensor] = []
        first = start // dim
        last = (start + n - 1) // dim
        rots = draws.rot[first : last + 1].tolist()
        self.values: list[float] = draws.sign[first : last + 1].tolist()
        stride = draws.stride
        pos, block = 0, first
        while pos < n:
            off = (start + pos) - block * dim
            size = min(n - pos, dim - off)
            q = off + rots[block - first]
            self.sizes.append(size)
            self.bounds.append((q, q + size))
            self.taus.append(tau[q + stride * block : q + stride * block + size])
            pos += size
            block += 1
        self._scratch: torch.Tensor | None = None
        self._targets: list[torch.Tensor] = []

    def targets(self, scratch: torch.Tensor) -> list[torch.Tensor]:
        """The segments' slices of ``scratch`` (made once per scratch tensor)."""
        if self._scratch is not scratch:
            self._targets = [scratch[lo:hi] for lo, hi in self.bounds]
            self._scratch = scratch
        return self._targets

    def add_(self, scratch: torch.Tensor, flat: torch.Tensor, scale: float = 1.0) -> None:
        """``scratch += scale · W(flat)``: ``flat`` (``numel`` values of the scratch's dtype and
        device) signed into its segments, one fused ``torch._foreach_addcmul_``."""
        values = self.values if scale == 1.0 else [v * scale for v in self.values]
        torch._foreach_addcmul_(self.targets(scratch), flat.split(self.sizes), self.taus, values)


def _hash_reference(j: int, key: int, dim: int) -> tuple[int, int]:
    """Pure-Python ``(h(j), s(j))`` of global coordinate ``j`` (the definition the sketch vectorises)."""
    return _hash_reference_full(j, key, dim)[:2]


def _hash_reference_full(j: int, key: int, dim: int) -> tuple[int, int, int]:
    """``(h(j), s(j), index of the τ entry j reads)`` in pure Python (tests check the proof's conditions on it)."""
    block, off = divmod(j, dim)
    sub = [mix64(key, s) for s in range(4)]
    hi = _fmix32(block ^ (sub[_ROT_HI] & _MASK32)) & 0x7FFFFFFF
    rot = ((hi << 32) | _fmix32(block ^ (sub[_ROT_LO] & _MASK32))) % dim
    q = off + rot  # the unwrapped rotated position, in [0, 2d)
    sigma = -1 if _fmix32(block ^ (sub[_SIGN] & _MASK32)) >> 31 else 1
    t = q + tau_stride(dim) * block
    tau = -1 if _fmix32(t ^ (sub[_TAU] & _MASK32)) >> 31 else 1
    return q % dim, sigma * tau, t


class CountSketch:
    """A seeded CountSketch ``R^P -> R^d`` over global coordinates (rotated-block hash, module docstring).

    Args:
        dim: the sketch dimension ``d`` (an integer in ``[1, 2^30]``), also the block length.
        seed: with the step, determines the hash; every rank must use the same.
        chunk: values per batch of the vectorised path (bounds its transient memory).
        vectorised: ``None`` (default) picks per device: on the CPU one fused
            ``torch._foreach_addcmul_`` over the blocks of each range (no transient at all), on
            accelerators batched gathers (a few kernels per ``chunk`` values instead of one per
            block). Both compute the same sketch (tested).

    Two ways to add: :meth:`add_` (``out [d] += S(x)``), or, when many ranges go into one sketch
    (the parameters of a model), :meth:`accumulate_` into a ``[2d]`` scratch for each of them and
    one :meth:`fold_` of the scratch into the sketch at the end.

    Example::

        cs = CountSketch(1 << 12, seed=0)
        key = cs.key(step=0)
        a, b = torch.randn(100_000), torch.randn(100_000)
        est = cs.sketch(a, key=key) @ cs.sketch(b, key=key)      # ≈ a @ b, error ≈ ‖a‖‖b‖/64
    """

    def __init__(self, dim: int, seed: int = 0, chunk: int = CHUNK, vectorised: bool | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 1 << 30:
            raise ValueError(f"sketch dimension must be an integer in [1, 2^30], got {dim!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.dim = dim
        self.seed = int(seed)
        self.chunk = int(chunk)
        self.vectorised = vectorised
        self._draws: _Draws | None = None
        self._draws_key: int | None = None

    def __repr__(self) -> str:
        return f"CountSketch(dim={self.dim}, seed={self.seed})"

    def key(self, step: int = 0) -> int:
        """The hash key of ``step`` (a new, independent hash every step)."""
        return mix64(self.seed, step)

    def draws(self, key: int, blocks: int) -> _Draws:
        """The draws of ``key`` covering at least ``blocks`` blocks (cached for the last key)."""
        most = max_blocks(self.dim)
        if blocks > most:
            raise ValueError(
                f"global coordinate {blocks * self.dim} is beyond what a sketch of dimension {self.dim} hashes "
                f"(at most {most} blocks of d coordinates): use a larger sketch_dim"
            )
        d = self._draws
        if d is None or self._draws_key != key or d.blocks < blocks:
            # grow geometrically: a model's blocks are met in order, parameter by parameter
            have = d.blocks if d is not None and self._draws_key == key else 0
            d = _Draws(self.dim, key, min(max(blocks, 2 * have, 64), most))
            self._draws, self._draws_key = d, key
        return d

    def buckets_and_signs(self, start: int, n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``h(j)`` (int64) and ``s(j)`` (±1.0, float64) of coordinates ``start .. start+n-1`` (tests, small sizes)."""
        j = torch.arange(start, start + n, dtype=torch.int64)
        block, off = j // self.dim, j % self.dim
        draws = self.draws(key, int(block.max()) + 1 if n else 1)
        q = off + draws.rot[block]
        return q % self.dim, draws.sign[block] * draws.tau[q + draws.stride * block]

    def add_(self, out: torch.Tensor, values: torch.Tensor, start: int, key: int, scale: float = 1.0) -> torch.Tensor:
        """``out += scale · S(x)`` where ``x`` is ``values`` (flattened) placed at global coordinates ``start ..``.

        ``out`` is a ``[d]`` floating tensor on ``values``' device; ``values`` of any floating
        dtype is accumulated in ``out.dtype``. Returns ``out``. Transient: a ``[2d]`` scratch.
        """
        if out.shape != (self.dim,):
            raise ValueError(f"sketch output must have shape ({self.dim},), got {tuple(out.shape)}")
        scratch = torch.zeros(2 * self.dim, dtype=out.dtype, device=out.device)
        return self.fold_(out, self.accumulate_(scratch, values, start, key, scale))

    def accumulate_(self, scratch: torch.Tensor, values: torch.Tensor, start: int, key: int,
                    scale: float = 1.0) -> torch.Tensor:
        """``scratch += scale · W(x)``, the unfolded sketch: :meth:`fold_` turns it into ``S(x)``.

        ``scratch`` is a ``[2d]`` floating tensor on ``values``' device (position ``q`` holds what
        goes to bucket ``q mod d``); any number of ranges may be accumulated before one fold.
        Returns ``scratch``.
        """
        dim = self.dim
        if scratch.shape != (2 * dim,):
            raise ValueError(f"sketch scratch must have shape ({2 * dim},), got {tuple(scratch.shape)}")
        flat = values.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            return scratch
        if flat.dtype != scratch.dtype:
            flat = flat.to(scratch.dtype)
        first, last = start // dim, (start + n - 1) // dim
        draws = self.draws(key, last + 1)
        vectorised = self.vectorised if self.vectorised is not None else scratch.device.type != "cpu"
        if not vectorised:
            self._add_planned(scratch, flat, start, draws, scale)
            return scratch
        tau = draws.on("tau", scratch.device, scratch.dtype)
        pos, block = 0, first
        while pos < n:
            off = (start + pos) - block * dim
            if off == 0 and n - pos >= 2 * dim:
                full = (n - pos) // dim
                self._add_blocks(scratch[:dim], flat[pos : pos + full * dim].view(full, dim), block, draws, tau, scale)
                pos += full * dim
                block += full
                continue
            m = min(n - pos, dim - off)
            self._add_planned(scratch, flat[pos : pos + m], start + pos, draws, scale)
            pos += m
            block += 1
        return scratch

    def fold_(self, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """``out += scratch[:d] + scratch[d:]``, then ``scratch`` is zeroed (ready for the next
        accumulation). Returns ``out``."""
        out.add_(scratch[: self.dim]).add_(scratch[self.dim :])
        scratch.zero_()
        return out

    def cpu_plan(self, start: int, n: int, key: int, dtype: torch.dtype) -> _Plan | None:
        """The piece plan of coordinates ``start .. start+n-1`` under ``key`` for the CPU path
        (``None`` where the batched path is used): a caller adding the same range many times may
        keep it and call ``plan.add_(scratch, flat)`` itself, which is what :meth:`accumulate_` does."""
        if self.vectorised or n == 0:
            return None
        draws = self.draws(key, (start + n - 1) // self.dim + 1)
        return draws.plan(self.dim, start, n, torch.device("cpu"), dtype)

    def _add_planned(self, scratch: torch.Tensor, flat: torch.Tensor, start: int, draws: _Draws, scale: float) -> None:
        """``flat`` (coordinates ``start ..``) signed into ``scratch`` by its cached :class:`_Plan`."""
        draws.plan(self.dim, start, flat.numel(), scratch.device, scratch.dtype).add_(scratch, flat, scale)

    def _add_blocks(self, out: torch.Tensor, blocks: torch.Tensor, first: int, draws: _Draws,
                    tau: torch.Tensor, scale: float) -> None:
        """Whole blocks ``[nb, d]`` starting at block ``first``, batched in bucket space into ``out``
        (``[d]``): gather each row's rotation (bucket ``h`` reads offset ``h − r_β``), multiply by
        the ``τ`` entries (``τ[q + m·β]`` with ``q = h + d·[h < r_β]``) and sum the rows with their signs."""
        dim = self.dim
        per = max(1, self.chunk // dim)
        cols = torch.arange(dim, device=out.device)
        for lo in range(0, blocks.shape[0], per):
            hi = min(lo + per, blocks.shape[0])
            b0 = first + lo
            rot = draws.on("rot", out.device)[b0 : first + hi, None]
            rotated = blocks[lo:hi].gather(1, torch.remainder(cols - rot, dim))
            beta = torch.arange(b0, first + hi, device=out.device)[:, None]
            rotated.mul_(tau[cols + dim * (cols < rot) + draws.stride * beta])
            sign = draws.on("sign", out.device, out.dtype)[b0 : first + hi]
            out.addmv_(rotated.T, sign, alpha=scale)

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
    """``(‖a‖²‖b‖² + ⟨a,b⟩² − 2 Σ_j a_j² b_j²) / d``: ``Var ⟨S a, S b⟩`` of a fully random CountSketch.

    An upper bound on this sketch's variance (:func:`exact_inner_product_variance` leaves out the
    pairs inside a block, which never collide here). ``sum_sq_products = Σ_j a_j² b_j²`` is
    unknown from sketches; leaving it at 0 gives a looser upper bound, tight when no few
    coordinates carry a large share of both vectors' mass and the vectors span many blocks (the
    case of gradients spread over millions of parameters). For ``a = b``: ``2(‖a‖⁴ − Σ a_j⁴)/d``.
    """
    return (sq_a * sq_b + dot_ab * dot_ab - 2.0 * sum_sq_products) / dim


def exact_inner_product_variance(a: torch.Tensor, b: torch.Tensor, dim: int, start: int = 0) -> float:
    """``Var ⟨S a, S b⟩`` over the key, exactly, for vectors placed at global coordinate ``start``.

    ``(‖a‖²‖b‖² + ⟨a,b⟩² − Σ_β (‖a_β‖²‖b_β‖² + ⟨a_β,b_β⟩²)) / d`` where ``β`` runs over the
    global blocks of ``d`` coordinates the vectors cover (pairs inside a block never collide).
    Needs the vectors themselves (tests, benchmarks); :func:`inner_product_variance` is the
    upper bound computable from a Gram.
    """
    a, b = a.detach().reshape(-1).to(torch.float64), b.detach().reshape(-1).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"vectors of different sizes: {a.numel()} and {b.numel()}")
    if a.numel() == 0:
        return 0.0
    block = (torch.arange(a.numel(), dtype=torch.int64) + start) // dim
    block -= block[0].clone()
    nb = int(block[-1]) + 1
    aa = torch.zeros(nb, dtype=torch.float64).index_add_(0, block, a * a)
    bb = torch.zeros(nb, dtype=torch.float64).index_add_(0, block, b * b)
    ab = torch.zeros(nb, dtype=torch.float64).index_add_(0, block, a * b)
    inside = float((aa * bb).sum() + (ab * ab).sum())
    return max(float(aa.sum() * bb.sum() + ab.sum() ** 2) - inside, 0.0) / dim


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
