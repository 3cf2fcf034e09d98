"""Flat per-task gradient buffers filled by parameter gradient hooks.

One ``[rows, P]`` float32 matrix holds every task's gradient (one row per task, two per task
with the split-half estimator, one for gradients produced outside any task context). Each row is
viewed per parameter, so a backward hook adds a parameter's gradient into its slice without
copies, and the Gram matrix of all rows is one matrix product.

Rows are allocated on first use and kept across steps. Instead of zeroing every row after each
step, a row remembers which parameter slices were written in the current step: the first write
copies, later ones add, and :meth:`FlatBuffers.finish` zeroes the slices a used row did not
receive (a parameter without gradient in that task's backward).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

RowKey = Hashable
CHUNK_COLUMNS = 1 << 18


class RowTable:
    """Rows of a 2-D ``data`` tensor (``[rows, width]``), one per key, allocated on first use and
    kept sorted by ``order(key)`` whatever the order of first use, so that every reduction over
    rows runs in the same order in a resumed run as in the original one. The bookkeeping shared by
    exact gradient rows (:class:`FlatBuffers`) and sketches (``storage.SketchStorage``).

    Subclasses call :meth:`_init_rows` and may extend :meth:`_moved` for per-row state of their own.
    """

    def _init_rows(
        self, width: int, dtype: torch.dtype, params: Sequence[torch.Tensor], order: Callable[[RowKey], Any] | None
    ) -> None:
        self.order = order
        self.dtype = dtype
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"parameters live on several devices {sorted(map(str, devices))}; balancedmix needs one")
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        self.data = torch.zeros(0, width, dtype=dtype, device=self.device)
        self.keys: list[RowKey] = []
        self._row_of: dict[RowKey, int] = {}
        self.used: set[int] = set()  # rows written in the current step
        self.dirty: set[int] = set()  # rows that may hold non-zero data (written in this or an earlier step)

    def row(self, key: RowKey) -> int:
        """Row index of ``key``, allocating a zeroed row on first use.

        An allocation may move existing rows (to keep the ``order``): row indices are valid only
        until the next allocation.
        """
        idx = self._row_of.get(key)
        if idx is None:
            idx = self._allocate([key])[0]
        return idx

    def reserve(self, keys: Sequence[RowKey]) -> None:
        """Allocate rows for ``keys`` at once (one reallocation), in this order."""
        new = [k for k in keys if k not in self._row_of]
        if new:
            self._allocate(new)

    def _allocate(self, keys: Sequence[RowKey]) -> list[int]:
        old_keys = self.keys
        new_keys = list(old_keys) + list(keys)
        if self.order is not None:
            new_keys.sort(key=self.order)
        position = {key: r for r, key in enumerate(new_keys)}
        remap = [position[key] for key in old_keys]  # old row index -> new row index
        data = torch.zeros(len(new_keys), self.data.shape[1], dtype=self.dtype, device=self.device)
        if remap:
            data[torch.tensor(remap, device=self.device)] = self.data
        self.data = data
        self.keys = new_keys
        self._row_of = position
        self.used = {remap[r] for r in self.used}
        self.dirty = {remap[r] for r in self.dirty}
        self._moved(remap)
        return [position[key] for key in keys]

    def _moved(self, remap: list[int]) -> None:
        """Rows were reallocated (old row ``r`` is now ``remap[r]``): move per-row state of a subclass."""

    def has(self, key: RowKey) -> bool:
        return key in self._row_of

    def index(self, key: RowKey) -> int:
        return self._row_of[key]

    def zero_rows(self, rows: Sequence[int]) -> None:
        for r in rows:
            self.data[r].zero_()
        self.dirty.difference_update(rows)

    def zero_unused(self) -> None:
        """Zero every row not used in the current step that may still hold data (fixed-shape collectives)."""
        self.zero_rows(sorted(self.dirty - self.used))

    def mark_complete(self, rows: Sequence[int]) -> None:
        """The data of ``rows`` was filled from outside (a collective): count them as used this step."""
        self.used = set(rows)
        self.dirty |= self.used

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class FlatBuffers(RowTable):
    """Per-row flat float32 gradient storage for a fixed list of parameters.

    Args:
        params: the trainable parameters, in a fixed order (the optimizer's param_groups order).
        dtype: storage dtype (float32: sums of bf16 micro-batch gradients stay accurate).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        dtype: torch.dtype = torch.float32,
        order: Callable[[RowKey], Any] | None = None,
    ) -> None:
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self._init_rows(self.numel, dtype, self.params, order)
        self._views: list[list[torch.Tensor]] = []
        self._written: list[list[bool]] = []
        #: gradients added per parameter this step, and a counter of steps (``reset`` calls): the
        #: DDP overlap hook (``distributed/ddp_overlap.py``) tells late captures and stale state by them
        self.param_adds = [0] * len(self.params)
        self.epoch = 0

    def _moved(self, remap: list[int]) -> None:
        written: list[list[bool]] = [[False] * len(self.params) for _ in self.keys]
        for r_old, r_new in enumerate(remap):
            written[r_new] = self._written[r_old]
        self._written = written
        self._views = [self._row_views(r) for r in range(len(self.keys))]

    def _row_views(self, r: int) -> list[torch.Tensor]:
        row = self.data[r]
        return [row[o : o + n].view(p.shape) for o, n, p in zip(self.offsets, self.numels, self.params)]

    # ---------------------------------------------------------------- filling
    def add(self, row: int, param_index: int, grad: torch.Tensor) -> None:
        """Accumulate one parameter's gradient into ``row`` (dense gradients only)."""
        if grad.is_sparse:
            raise TypeError(
                f"sparse gradient for parameter {param_index} {tuple(grad.shape)}; balancedmix supports dense gradients "
                "only: build the module with sparse=False (e.g. nn.Embedding(..., sparse=False)); see docs/optimizers.md"
            )
        view = self._views[row][param_index]
        written = self._written[row]
        self.param_adds[param_index] += 1
        if written[param_index]:
            view.add_(grad)
        else:
            view.copy_(grad)
            written[param_index] = True
        self.used.add(row)

    def view(self, row: int, param_index: int) -> torch.Tensor:
        """``row``'s slice of one parameter, shaped like it (valid until the next row allocation)."""
        return self._views[row][param_index]

    def written(self, row: int, param_index: int) -> bool:
        """Whether ``row`` received a gradient of the parameter in the current step."""
        return self._written[row][param_index]

    def store(self, row: int, param_index: int, grad: torch.Tensor) -> None:
        """Set ``row``'s slice of the parameter to ``grad`` (already the row's running sum), marked written."""
        self._views[row][param_index].copy_(grad)
        self._written[row][param_index] = True
        self.used.add(row)

    def finish(self) -> list[int]:
        """Zero the slices that used rows did not receive this step; return the used rows, sorted."""
        rows = sorted(self.used)
        for r in rows:
            written = self._written[r]
            if not all(written):
                for i, done in enumerate(written):
                    if not done:
                        self._views[r][i].zero_()
        return rows

    def reset(self) -> None:
        """Start a new step: every row counts as empty (data is overwritten on first write)."""
        for r, written in enumerate(self._written):  # every row: the DDP overlap hook marks rows this rank did not use
            if r in self.used or any(written):
                self._written[r] = [False] * len(self.params)
        self.dirty |= self.used
        self.used = set()
        self.param_adds = [0] * len(self.params)
        self.epoch += 1

    def mark_complete(self, rows: Sequence[int]) -> None:
        """The data of ``rows`` was filled from outside (a collective): count them as fully written, used this step."""
        for r in rows:
            self._written[r] = [True] * len(self.params)
        super().mark_complete(rows)

    def slice(self, param_index: int) -> slice:
        return slice(self.offsets[param_index], self.offsets[param_index + 1])

    def chunks(self, param_index: int, max_columns: int = CHUNK_COLUMNS) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` ranges, local to the parameter, of at most ``max_columns`` elements.

        Step-time reductions walk the buffer chunk by chunk so that a ``[rows, chunk]`` block
        (4 MB for 4 rows) stays in cache between its Gram product and its other uses.
        """
        numel = self.numels[param_index]
        for start in range(0, numel, max_columns):
            yield start, min(start + max_columns, numel)
