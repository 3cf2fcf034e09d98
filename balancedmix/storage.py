"""Where per-task gradients are kept: exact rows or sketches, behind one interface.

The optimizer asks a storage four things, whichever kind it has:

- ``add(row, param_index, grad)`` — called by the gradient hook with one parameter's gradient of
  one backward, attributed to ``row`` (a task, a split-half of a task, or untagged).
- ``hook_scale(row)`` — the factor the gradient hook applies to a gradient of ``row`` before
  autograd accumulates it into ``p.grad`` (exact: 1; sketch: the row's lagged coefficient).
- ``row_stats(grads)`` — the Gram matrix of the rows ``[n, n]``, their dot products with the
  current ``p.grad`` ``[n]`` and ``‖p.grad‖²``, all float64 (for the sketch: of the sketches).
- ``applied()`` — the coefficient each row's gradient carries in ``p.grad`` right now
  (exact: 1 for every row; sketch: the lagged coefficients the hooks applied).
- ``combine(coef, scale, grads)`` — make the step's update ``s · Σ_r c_r B_r``. Exact storage
  writes it into ``p.grad`` now; sketch storage cannot (it holds no gradient), so it keeps ``c``
  and its hooks apply it to the *next* step's gradients (``lagged = True``). Either way it
  returns the coefficients that this step's update actually carries.

Plus the row bookkeeping of :class:`~balancedmix.buffers.FlatBuffers` (``row``, ``reserve``,
``keys``, ``used``, ``finish``, ``reset``, ``zero_rows``, ``zero_unused``, ``mark_complete``,
``data``, ``nbytes``), ``figure_errors`` / ``entry_error`` (the standard errors the storage
puts on the figures; ``None`` for exact rows) and ``state_dict``/``load_state_dict``.

:class:`ExactStorage` is :class:`~balancedmix.buffers.FlatBuffers` (``K × P`` values) with the
statistics and the combination that the optimizer used to do itself. :class:`SketchStorage`
keeps one :class:`~balancedmix.sketch.CountSketch` vector of ``d`` values per row (``K × d``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from .buffers import FlatBuffers, RowKey, RowTable
from .sketch import CountSketch, figure_standard_errors, global_starts, inner_product_variance

__all__ = ["ExactStorage", "LaggedExactStorage", "LaggedCoefficients", "SketchStorage", "GradientStorage", "make_storage"]

GradList = Sequence["torch.Tensor | None"]


class LaggedCoefficients:
    """The lagged half of the interface: coefficients set at one step scale the next step's gradients.

    Mixed into a storage that cannot (sketch) or must not (a measured subset: the other
    parameters' gradients are not kept) write the correction into ``p.grad`` at ``step()``.
    The hook asks :meth:`hook_scale` and hands autograd ``c · grad``; :meth:`combine` keeps
    the new coefficients and returns the ones this step's update carries. A row key without a
    coefficient (first step, first sight of a task) gets 1; a task absent from a step keeps its
    last one.
    """

    lagged = True
    can_rebuild = False
    keys: list[RowKey]
    used: set[int]

    def _init_lag(self) -> None:
        self._coef: dict[RowKey, float] = {}

    def hook_scale(self, row: int | None) -> float:
        """The lagged coefficient of ``row`` (``None``: untagged, 1): the hook hands ``c · grad`` to autograd."""
        return 1.0 if row is None else self._coef.get(self.keys[row], 1.0)

    def applied(self) -> torch.Tensor:
        """The lagged coefficient each row's gradient carries in ``p.grad`` this step."""
        return torch.tensor([self._coef.get(k, 1.0) for k in self.keys], dtype=torch.float64)

    def combine(self, coef: torch.Tensor, scale: float, grads: GradList, rebuild: bool = False) -> torch.Tensor:
        """Keep ``coef`` for the next step's hooks; ``p.grad`` is left as it is.

        Returns the coefficients this step's update carries (those set at the previous step).
        Rows not in this step keep their last coefficient (1 until a first one is set).
        """
        if rebuild:
            raise ValueError(
                f"a {self.kind} storage applies corrections through the next step's hooks: it cannot rebuild p.grad now "
                "(nonfinite='skip_task')"
            )
        applied = self.applied()
        coef = coef.to(torch.float64)
        if coef.numel() != len(self.keys):
            raise ValueError(f"combine() got {coef.numel()} coefficients for {len(self.keys)} rows")
        for r in sorted(self.used):
            self._coef[self.keys[r]] = float(coef[r])
        return applied

    def set_coefficients(self, coefficients: dict[RowKey, float]) -> None:
        """Set the lagged coefficients directly (``{row key: c}``; tests, resume)."""
        self._coef = {k: float(v) for k, v in coefficients.items()}

    def _lag_state(self) -> list[list[Any]]:
        return [[list(k) if isinstance(k, tuple) else k, v] for k, v in self._coef.items()]

    def _load_lag_state(self, items: list[list[Any]]) -> None:
        self._coef = {tuple(k) if isinstance(k, list) else k: float(v) for k, v in items}


class ExactStorage(FlatBuffers):
    """Exact per-row gradients (``[rows, P]`` float32): figures are exact, corrections apply this step."""

    kind = "exact"
    #: the combination reaches p.grad at the next step (through the hooks), not now
    lagged = False
    #: combine(..., rebuild=True) can write p.grad from the rows alone
    can_rebuild = True
    #: the rows are gradients (captured_gradients() can return them)
    holds_gradients = True
    #: row_stats of local shards add up across ranks (FSDP2 sums the products, not the rows)
    additive_stats = True

    def applied(self) -> torch.Tensor:
        """Coefficient of each row in ``p.grad`` now: 1 (hooks never scale an exact row's gradient)."""
        return torch.ones(len(self.keys), dtype=torch.float64)

    def hook_scale(self, row: int | None) -> float:
        """1: the hooks hand gradients to autograd unchanged (the correction is written at ``step()``)."""
        return 1.0

    def row_stats(
        self, grads: GradList | None, reduce: Callable[[torch.Tensor], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gram of all rows ``[n, n]``, their dot products with ``grads`` ``[n]`` and ``‖grads‖²``.

        One pass over the buffer in cache-sized chunks: each chunk's Gram block and its dot
        products with ``p.grad`` are computed back to back (the second read hits the cache), in
        float32, and summed across chunks in float64 — a single float32 accumulation over 10⁷
        elements loses enough to misjudge nearly opposite task gradients. ``grads`` are the
        rank-local gradients, one per parameter (``None``: no gradient), or ``None`` to skip the
        dots. Local shards only (FSDP2 sums these products across ranks afterwards, so ``reduce``
        is not used: ``additive_stats``). Float64 tensors on the buffers' device.

        Only the span of the rows used this step is read (the entries of other rows are left 0
        and never consulted): under DDP every declared row exists, and the untagged row or an
        absent task at the ends would otherwise cost a full pass each.
        """
        data = self.data
        n = data.shape[0]
        row_gram = torch.zeros(n, n, dtype=torch.float64, device=data.device)
        grad_dots = torch.zeros(n, dtype=torch.float64, device=data.device)
        grad_sq = torch.zeros((), dtype=torch.float64, device=data.device)
        used = sorted(self.used)
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        gram_span = row_gram[lo:hi, lo:hi]
        dots_span = grad_dots[lo:hi]
        for i in range(len(self.params)):
            offset = self.offsets[i]
            grad = grads[i] if grads is not None else None
            grad = grad.reshape(-1) if grad is not None else None
            for start, stop in self.chunks(i):
                block = data[lo:hi, offset + start : offset + stop]
                if hi > lo:
                    gram_span += (block @ block.T).to(torch.float64)
                if grad is not None:
                    g = grad[start:stop].to(self.dtype)
                    if hi > lo:
                        dots_span += (block @ g).to(torch.float64)
                    grad_sq += torch.dot(g, g).to(torch.float64)
        return row_gram, grad_dots, grad_sq

    def gram_and_sum(self, weights: torch.Tensor, out: GradList) -> torch.Tensor:
        """Gram of the rows ``[n, n]`` (float64, as :meth:`row_stats`) and ``out = Σ_r w_r B_r``, in one pass.

        ``capture="direct"``: ``p.grad`` is written from the rows while each chunk's block is in
        cache for its Gram product, instead of a second pass over the rows after it. ``out`` holds
        one tensor per parameter (``None``: the parameter got no gradient, not written). As in
        :meth:`row_stats`, only the span of the rows used this step is read (``weights`` must be 0
        outside it; the Gram's other entries stay 0).
        """
        data = self.data
        n = data.shape[0]
        row_gram = torch.zeros(n, n, dtype=torch.float64, device=data.device)
        used = sorted(self.used)
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        gram_span = row_gram[lo:hi, lo:hi]
        w = weights.to(device=data.device, dtype=self.dtype)[None, lo:hi]  # [1, span]: w @ block, a [1, chunk] product
        for i, grad in enumerate(out):
            if grad is not None and hi == lo:
                grad.zero_()
                continue
            offset = self.offsets[i]
            flat = grad.view(-1) if grad is not None and grad.is_contiguous() else None
            for start, stop in self.chunks(i):
                block = data[lo:hi, offset + start : offset + stop]
                if hi > lo:
                    gram_span += (block @ block.T).to(torch.float64)
                if flat is not None:
                    torch.mm(w, block, out=flat[start:stop].unsqueeze(0))
            if grad is not None and flat is None:
                grad.copy_((w @ data[lo:hi, self.slice(i)]).view_as(grad))
        return row_gram

    def combine(self, coef: torch.Tensor, scale: float, grads: GradList, rebuild: bool = False) -> torch.Tensor:
        """Write the update into ``grads`` (``p.grad``, rank-local) now; returns ``coef``.

        ``rebuild=False``: ``p.grad`` holds ``scale · Σ_r B_r`` and becomes ``scale · Σ_r c_r B_r``
        (``p.grad += scale · Σ_r (c_r − 1) B_r``; untouched when every ``c_r = 1``, so ``sum`` is
        bit-identical to the plain optimizer). ``rebuild=True``: ``p.grad = scale · Σ_r c_r B_r``.
        ``w @ block`` (a non-transposed matrix-vector product) is several times faster than
        ``block.T @ w`` on wide slices such as an embedding.
        """
        coef = coef.to(torch.float64)
        weights = scale * coef if rebuild else scale * (coef - 1.0)
        if not rebuild and bool(torch.all(coef == 1.0)):
            return coef
        w = weights.to(device=self.data.device, dtype=self.dtype)
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            offset = self.offsets[i]
            if grad.is_contiguous():
                flat = grad.view(-1)
                for start, stop in self.chunks(i):
                    upd = w @ self.data[:, offset + start : offset + stop]
                    if rebuild:
                        flat[start:stop].copy_(upd)
                    else:
                        flat[start:stop].add_(upd)
                continue
            upd = (w @ self.data[:, self.slice(i)]).view_as(grad)
            if rebuild:
                grad.copy_(upd)
            else:
                grad.add_(upd)
        return coef

    def figure_errors(
        self, gram: torch.Tensor, coef: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Exact figures carry no error from the storage: ``None``."""
        return None

    def entry_error(self, row_gram: torch.Tensor, a: int, b: int) -> float | None:
        """Exact: ``None``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)


class LaggedExactStorage(LaggedCoefficients, ExactStorage):
    """Exact rows of a measured *subset* of the parameters; the correction acts one step late.

    The figures are exact for the subset. The coefficients they give are applied to every
    parameter through the gradient hooks at the next step (the gradients of the parameters
    outside the subset are not kept, so they cannot be corrected at ``step()``).
    """

    kind = "exact_subset"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_lag()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "coefficients": self._lag_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self._load_lag_state(state["coefficients"])


class SketchStorage(LaggedCoefficients, RowTable):
    """One CountSketch ``[d]`` per row; the correction is applied by the hooks one step later.

    Args:
        params: the trainable parameters (rank-local tensors, the optimizer's order).
        dim: sketch dimension ``d``.
        seed: hash seed (identical on every rank); the hash changes every step.
        dtype: sketch dtype (float32; float64 for float64 models).
        order: canonical row order, as for :class:`~balancedmix.buffers.FlatBuffers`.
        starts: global coordinate of each parameter's first local element (default
            :func:`~balancedmix.sketch.global_starts` of ``params``, which reads FSDP2 shards);
            pass it when ``params`` are local shards of DTensors.

    Memory: ``rows × d`` values (``K × d``, ``2K × d`` with the split estimator, +d when untagged
    backwards happen) and a ``[2d]`` scratch for the row being written; no transient on the CPU
    (accelerators: one batch of ``CHUNK`` gathered values), and, in the optimizer's hook, the
    scaled gradient of one parameter when the lagged coefficient is not 1.
    """

    kind = "sketch"
    holds_gradients = False
    #: the Gram of local sketches is not the sum of ranks' Grams: the sketches are summed first
    additive_stats = False

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        dim: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        order: Callable[[RowKey], Any] | None = None,
        starts: Sequence[int] | None = None,
    ) -> None:
        self.params = list(params)
        self.sketcher = CountSketch(dim, seed)
        self.dim = dim
        self.starts = list(starts) if starts is not None else global_starts(self.params)
        if len(self.starts) != len(self.params):
            raise ValueError(f"starts has {len(self.starts)} entries for {len(self.params)} parameters")
        self._scratch_row: int | None = None  # the row whose unfolded sketch the scratch holds
        self._init_rows(dim, dtype, self.params, order)
        # the active row's adds go into a [2d] scratch (one contiguous add per block), folded into
        # the row when another row is written or any row is read (``data``)
        self._scratch = torch.zeros(2 * dim, dtype=dtype, device=self.device)
        self._plans: list[Any] = [None] * len(self.params)  # CPU piece plan per parameter, this period's key
        # global blocks the local coordinates reach: the hash's draws are made for all of them at once
        end = max((s + p.numel() for s, p in zip(self.starts, self.params)), default=0)
        self._blocks = max(1, -(-end // dim))
        self.period = 0  # counts reset()s: the hash key of the current accumulation period
        self._key = self.sketcher.key(0)
        self._init_lag()  # lagged coefficient per row key (absent: 1)

    @property
    def data(self) -> torch.Tensor:
        """The row sketches ``[rows, d]``, with the scratch's pending adds folded in first."""
        if self._scratch_row is not None:
            self._flush()
        return self._rows

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._rows = value

    @property
    def nbytes(self) -> int:
        """Bytes held: the rows (``rows × d``) and the ``[2d]`` scratch."""
        return (self._rows.numel() + self._scratch.numel()) * self._rows.element_size()

    def _flush(self) -> None:
        """Fold the scratch into its row (and zero it)."""
        row, self._scratch_row = self._scratch_row, None
        if row is not None:
            self.sketcher.fold_(self._rows[row], self._scratch)

    # ---------------------------------------------------------------- rows (RowTable)
    def finish(self) -> list[int]:
        """The rows used this step, sorted (a sketch row needs no completion)."""
        self._flush()
        return sorted(self.used)

    def reset(self) -> None:
        """Start a new accumulation period: used rows zeroed, a new hash key."""
        self._flush()
        self.zero_rows(sorted(self.used | self.dirty))
        self.used = set()
        self.period += 1
        self._key = self.sketcher.key(self.period)
        self._plans = [None] * len(self.params)
        self.sketcher.draws(self._key, self._blocks)

    @property
    def key(self) -> int:
        """Hash key of the current accumulation period (identical on every rank)."""
        return self._key

    # ---------------------------------------------------------------- the interface
    def add(self, row: int, param_index: int, grad: torch.Tensor) -> None:
        """Sketch ``grad`` (one parameter's gradient, rank-local) into ``row`` (through the scratch)."""
        if grad.is_sparse:
            raise TypeError(f"sparse gradient for parameter {param_index}; balancedmix supports dense gradients only")
        if self._scratch_row != row:
            self._flush()
            self._scratch_row = row
        plan = self._plans[param_index]
        if plan is None and self._scratch.device.type == "cpu":
            plan = self._plans[param_index] = self.sketcher.cpu_plan(
                self.starts[param_index], grad.numel(), self._key, self.dtype
            )
        if plan is not None and grad.dtype == self.dtype and grad.is_contiguous() and grad.numel() == plan.numel:
            # the hooks' path, once per parameter and micro-batch: the cached plan, no re-checks
            plan.add_(self._scratch, grad.view(-1))
        else:
            self.sketcher.accumulate_(self._scratch, grad, self.starts[param_index], self._key)
        self.used.add(row)

    def _sketch_into(self, out: torch.Tensor, grads: GradList) -> torch.Tensor:
        """``out += S(grads)`` with this period's hash, through the (flushed) scratch."""
        self._flush()
        for i, g in enumerate(grads):
            if g is not None:
                self.sketcher.accumulate_(self._scratch, g, self.starts[i], self._key)
        return self.sketcher.fold_(out, self._scratch)

    def sketch_grads(self, grads: GradList) -> torch.Tensor:
        """``S(p.grad)`` (float64 ``[d]``) of the rank-local gradients, with this period's hash."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        return self._sketch_into(out, grads).to(torch.float64)

    def row_stats(
        self, grads: GradList | None, reduce: Callable[[torch.Tensor], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gram of the row sketches, their dots with ``S(p.grad)`` and ``‖S(p.grad)‖²`` (float64).

        All three live in the sketch space, where a uniform rescale of ``p.grad`` stays exactly a
        rescale (``S`` is linear), so the optimizer's consistency check keeps its tolerance.
        ``reduce`` (FSDP2: an in-place sum over ranks) first turns the local shards' sketches of
        the rows and of ``p.grad`` into global ones: one collective of ``(rows + 1) × d`` values.
        """
        n = len(self.keys)
        both = torch.empty(n + 1, self.dim, dtype=self.dtype, device=self.device)
        both[:n] = self.data
        both[n] = 0.0
        if grads is not None:
            self._sketch_into(both[n], grads)
        if reduce is not None:
            reduce(both)
            self.data.copy_(both[:n])
        rows, sg = both[:n].to(torch.float64), both[n].to(torch.float64)
        return rows @ rows.T, rows @ sg, sg @ sg

    def figure_errors(
        self, gram: torch.Tensor, coef: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Standard errors of the norms, update shares and cosines computed from the sketched task
        Gram ``gram`` (update coefficients ``coef``, ``k`` tasks then possibly untagged):
        :func:`~balancedmix.sketch.figure_standard_errors`."""
        return figure_standard_errors(gram, coef, k, self.dim)

    def entry_error(self, row_gram: torch.Tensor, a: int, b: int) -> float | None:
        """Standard error of the sketched inner product of rows ``a`` and ``b`` (plug-in)."""
        g_aa, g_bb, g_ab = float(row_gram[a, a]), float(row_gram[b, b]), float(row_gram[a, b])
        return math.sqrt(max(inner_product_variance(g_aa, g_bb, g_ab, self.dim), 0.0))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "seed": self.sketcher.seed, "period": self.period,
                "coefficients": self._lag_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        if int(state["dim"]) != self.dim or int(state["seed"]) != self.sketcher.seed:
            raise ValueError(
                f"state dict was saved with sketch_dim={state['dim']}, seed={state['seed']}; this optimizer has "
                f"sketch_dim={self.dim}, seed={self.sketcher.seed}"
            )
        self._flush()  # pending adds belong to the old key's rows
        self.period = int(state["period"])
        self._key = self.sketcher.key(self.period)
        self._plans = [None] * len(self.params)
        self._load_lag_state(state["coefficients"])


GradientStorage = Union[ExactStorage, LaggedExactStorage, SketchStorage]
"""Either storage; both offer the interface described in this module's docstring."""


def make_storage(
    params: Sequence[torch.Tensor],
    local: Sequence[torch.Tensor],
    sketch_dim: int | None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    order: Callable[[RowKey], Any] | None = None,
    subset: bool = False,
) -> GradientStorage:
    """Exact rows (``sketch_dim=None``) or sketches of ``sketch_dim`` values per row.

    ``params`` are the measured parameters as the optimizer holds them (DTensors under FSDP2:
    their global shapes and shard offsets give the sketch's coordinates), ``local`` their
    rank-local tensors. ``subset``: they are a strict subset of the trained parameters, so exact
    rows too must correct through the next step's hooks (:class:`LaggedExactStorage`).
    """
    if sketch_dim is None:
        if subset:
            return LaggedExactStorage(local, dtype=dtype, order=order)
        return ExactStorage(local, dtype=dtype, order=order)
    return SketchStorage(local, sketch_dim, seed=seed, dtype=dtype, order=order, starts=global_starts(params))


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state dict holds a {state.get('kind')!r} gradient storage, this optimizer uses {kind!r}")
