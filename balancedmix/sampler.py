"""MixtureSampler: task-level control of the prompts in each GRPO generation batch.

The index stream has exactly the structure of TRL's ``RepeatSampler`` (``trl/trainer/utils.py``),
so the sampler can replace ``GRPOTrainer._get_train_sampler`` with nothing else changed::

    batch b (B = prompts_per_batch unique prompts, G = num_generations, R = repeat_count):
        [i1]*G + [i2]*G + ... + [iB]*G          one block of B*G indices, a GRPO group never split
        ... the block repeated R times in a row  (TRL: num_iterations * steps_per_generation)

The indices are generated one at a time, as ``RepeatSampler`` does: memory is ``O(B)`` per batch
whatever ``R`` is (``repeat_count=10**6`` does not build a ``B*G*R`` list).

What differs from ``RepeatSampler`` is *which* B prompts form a batch:

* the task composition of batch b follows the weights of a mixture schedule
  (:mod:`balancedmix.schedules`): a dict of fixed weights, size-proportional (the default, the
  mixture of a plain shuffle), temperature, or an adaptive policy;
* the counts are rounded by the quota method (``rounding="largest_remainder"``, the default): the
  prompts are allotted one slot at a time to the eligible task whose cumulative count is furthest
  behind its target, so with constant weights every task's cumulative count stays strictly within
  one prompt of ``weight × slots`` at every slot (``floor(h·p_t) <= N_t(h) <= ceil(h·p_t)``), a task
  is never starved by rounding, and the arithmetic is exact (integers, no float drift). When the
  weights change, each task's deficit carries over (re-expressed in the new weights' units).
  ``rounding="multinomial"`` draws the counts instead;
* ``min_per_task=m`` first gives ``m`` prompts to every task of positive weight; the remaining
  ``B - m·K₊`` slots follow the weights;
* within a task, prompts come from a per-task random permutation, taken without replacement and
  reshuffled when exhausted (a *task epoch*; counted in :attr:`MixtureSampler.task_epochs`).
  When a task runs out in the middle of a batch, the prompts it already gave to that batch go to
  the back of its next permutation, so no prompt appears twice in a batch unless the task has
  fewer prompts than its share of the batch;
* the order of the B prompts is a random permutation, or with ``homogeneous=True`` an order in
  which as many micro-batches of ``micro_batch_size`` indices as possible hold a single task.

The stream is infinite by construction and a pure function of the seed and of the weights of each
batch (every random draw uses a generator seeded by ``(seed, purpose, task or batch, ...)``), so
every rank built with the same arguments produces the same stream, and the sampler can jump to any
batch by replaying counts. ``len(sampler)`` is the finite length of one *epoch* of the sampler,
``num_batches * B * G * R`` with ``num_batches = N // B`` by default — the same as
``RepeatSampler`` — and epoch ``e`` (``set_epoch(e)``, or the next one when iteration simply
continues) yields batches ``e*num_batches ... (e+1)*num_batches - 1`` of the stream.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any, Union

import numpy as np
from torch.utils.data import Sampler

from .schedules import MixtureSchedule, as_schedule, validate_weights
from .tasks import MissingTaskLabelError, TaskError, TaskKey, TaskRegistry, UnknownTaskError, task_labels

__all__ = ["MixtureSampler", "read_task_labels", "homogeneous_order", "class_label_names"]

logger = logging.getLogger(__name__)

_PERM, _ORDER, _MULTI = 1, 2, 3  # purposes of the seeded generators
_STATE_VERSION = 1


def class_label_names(dataset: Any, column: Any) -> list[str] | None:
    """The class names of ``column`` when it is an HF ``datasets.ClassLabel`` feature, else ``None``.

    A ``ClassLabel`` column stores integers; ``names[i]`` is the task name of label ``i``. Only
    the dataset's schema (``dataset.features``) is read, never its rows.
    """
    if not isinstance(column, str):
        return None
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(features, "get"):
        return None
    feature = features.get(column)
    names = getattr(feature, "names", None)
    if type(feature).__name__ == "ClassLabel" and isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


def _decode_class_labels(raw: Sequence[Any], names: Sequence[str], column: str) -> list[Any]:
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < len(names):
            if isinstance(v, str) and v in names:
                out.append(v)
                continue
            raise TaskError(f"row {i}: ClassLabel column {column!r} holds {v!r}, not a class index of {list(names)}")
        out.append(names[int(v)])
    return out


def read_task_labels(dataset: Any, task_key: TaskKey, registry: TaskRegistry) -> list[str]:
    """One task name per row of ``dataset``, read once.

    * HF ``datasets.Dataset`` (anything with ``column_names``) and ``task_key`` a column name: the
      column is read in one call, ``dataset[task_key]``; no row is materialised.
    * Otherwise (a list of dicts, a torch map-style dataset): rows ``dataset[i]`` are read once
      each and ``row[task_key]`` (or ``task_key(row)`` for a callable) is kept.

    Labels are ``str`` names, or integer indices into a declared ``tasks`` list. An HF
    ``ClassLabel`` column's integers are decoded with the feature's own ``names`` (not the
    ``tasks`` order).

    Raises:
        MissingTaskLabelError: no such column, or a row without the key.
        UnknownTaskError: a label outside the declared tasks (naming the first row that has it).
        TaskError: an empty dataset, or a label that is not a name or index.
    """
    try:
        n = len(dataset)
    except TypeError:
        raise TaskError(
            f"MixtureSampler needs a map-style dataset with a length, got {type(dataset).__name__}"
        ) from None
    if n == 0:
        raise TaskError("the dataset is empty")
    columns = getattr(dataset, "column_names", None)
    if not callable(task_key) and columns is not None and not callable(columns):
        if task_key not in columns:
            raise MissingTaskLabelError(f"the dataset has no task column {task_key!r}; its columns are {list(columns)}")
        raw = list(dataset[task_key])
        if len(raw) != n:
            raise TaskError(f"column {task_key!r} has {len(raw)} values for {n} rows")
        class_names = class_label_names(dataset, task_key)
        if class_names is not None:
            raw = _decode_class_labels(raw, class_names, task_key)
    else:
        raw = []
        for i in range(n):
            row = dataset[i]
            if callable(task_key):
                labels = task_labels(row, task_key, registry)
                if len(labels) != 1:
                    raise TaskError(f"task_key returned {len(labels)} labels for row {i}; it must return one")
                raw.append(labels[0])
            elif isinstance(row, Mapping):
                if task_key not in row:
                    raise MissingTaskLabelError(
                        f"row {i} of the dataset has no task key {task_key!r}; its keys are {sorted(map(str, row))}"
                    )
                raw.append(row[task_key])
            else:
                raise MissingTaskLabelError(
                    f"row {i} of the dataset is a {type(row).__name__}, not a mapping; "
                    f"pass a callable task_key (row -> task name) to read its task"
                )
    names = task_labels({"_": raw}, "_", registry)
    for name in dict.fromkeys(names):
        try:
            registry.index(name)
        except UnknownTaskError:
            row = names.index(name)
            raise UnknownTaskError(
                f"row {row} of the dataset has task {name!r}, which is not among the declared tasks {list(registry.names)}"
            ) from None
    return names


def homogeneous_order(counts: Sequence[int], group: int, micro_batch: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Order a batch's prompts so that as many micro-batches as possible hold one task.

    Args:
        counts: prompts per task in the batch, ``[K]``.
        group: indices per prompt (``num_generations``).
        micro_batch: indices per micro-batch.
        rng: shuffles the order of the single-task units and of the tasks.

    Returns:
        ``(task, number_of_prompts)`` runs in stream order.

    The batch is cut in units of ``u = lcm(group, micro_batch) / group`` prompts (a whole number of
    prompts *and* of micro-batches). Every task first fills as many whole units as it can, in random
    order; the left-over prompts of all tasks follow, grouped by task. When ``micro_batch`` is a
    multiple of ``group`` this is optimal: ``Σ_t floor(n_t·group / micro_batch)`` single-task
    micro-batches, the most any order can give. When ``group`` is a multiple of ``micro_batch``,
    every micro-batch lies inside one group and is single-task anyway.
    """
    unit = math.lcm(group, micro_batch) // group
    units: list[tuple[int, int]] = []
    rest: list[tuple[int, int]] = []
    for t, c in enumerate(counts):
        full, left = divmod(int(c), unit)
        units.extend([(t, unit)] * full)
        if left:
            rest.append((t, left))
    order = rng.permutation(len(units)) if units else []
    rest_order = rng.permutation(len(rest)) if rest else []
    return [units[i] for i in order] + [rest[i] for i in rest_order]


_RATIO_DENOMINATOR = 1 << 26


def _integer_weights(weights: Mapping[str, float], tasks: Sequence[str]) -> tuple[int, ...]:
    """Integers proportional to the weights, for exact quota arithmetic.

    Each ratio ``w_t / max_s w_s`` is replaced by the nearest fraction with a denominator of at
    most 2^26, which recovers ratios of integers up to 2^26 exactly (task sizes, ``0.3 : 0.7``);
    a positive weight never becomes 0.
    """
    top = max(weights[t] for t in tasks)
    fracs = []
    for t in tasks:
        f = Fraction(weights[t] / top).limit_denominator(_RATIO_DENOMINATOR)
        if f == 0 and weights[t] > 0:
            f = Fraction(1, _RATIO_DENOMINATOR)
        fracs.append(f)
    denom = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * denom) for f in fracs]
    g = math.gcd(*ints)
    return tuple(i // g for i in ints)


class _Stream:
    """Position of the infinite stream at a batch boundary (small, copyable, serialisable)."""

    __slots__ = ("epochs", "positions", "moved", "deficits", "weights")

    def __init__(self, k: int) -> None:
        self.epochs = [0] * k  # current permutation number of each task
        self.positions = [0] * k  # prompts already taken from it
        self.moved: list[tuple[int, ...]] = [()] * k  # local items sent to the back of that permutation
        self.deficits = [0] * k  # quota deficits in units of 1/sum(weights)
        self.weights: tuple[int, ...] | None = None  # integer weights the deficits refer to

    def copy(self) -> _Stream:
        out = _Stream.__new__(_Stream)
        out.epochs, out.positions = list(self.epochs), list(self.positions)
        out.moved, out.deficits = list(self.moved), list(self.deficits)
        out.weights = self.weights
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": list(self.epochs),
            "positions": list(self.positions),
            "moved": [list(m) for m in self.moved],
            "deficits": [str(d) for d in self.deficits],  # big ints as strings (JSON-safe)
            "weights": None if self.weights is None else [str(w) for w in self.weights],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _Stream:
        out = cls(len(d["epochs"]))
        out.epochs = [int(x) for x in d["epochs"]]
        out.positions = [int(x) for x in d["positions"]]
        out.moved = [tuple(int(i) for i in m) for m in d["moved"]]
        out.deficits = [int(x) for x in d["deficits"]]
        out.weights = None if d["weights"] is None else tuple(int(x) for x in d["weights"])
        return out


class MixtureSampler(Sampler[int]):
    """Index sampler for GRPO with a controlled task mixture per generation batch.

    Args:
        dataset: map-style dataset (HF ``datasets.Dataset``, list of dicts, torch dataset).
        task_key: column/key holding each row's task, or a callable ``row -> task``.
        weights: ``None`` (size-proportional), a dict task -> weight (fixed), or a schedule
            (:mod:`balancedmix.schedules`, or any object with ``weights(step)`` and ``update(metrics)``).
        prompts_per_batch: B, unique prompts per (global) generation batch; TRL:
            ``generation_batch_size // num_generations``.
        num_generations: G, consecutive copies of each prompt (a GRPO group).
        repeat_count: R, consecutive copies of each batch; TRL: ``num_iterations * steps_per_generation``.
        seed: the stream's seed; the same on every rank.
        tasks: declared task names (closed registry; fixes their order). Default: order of first sight.
        rounding: ``"largest_remainder"`` (exact quota rounding, default) or ``"multinomial"``.
        min_per_task: prompts every positive-weight task gets in every batch.
        homogeneous: order each batch for single-task micro-batches (needs ``micro_batch_size``).
        micro_batch_size: indices per micro-batch (the DataLoader's batch size), for ``homogeneous``.
        num_batches: batches per sampler epoch (default ``max(1, N // B)``, as ``RepeatSampler``).

    Raises:
        MissingTaskLabelError, UnknownTaskError, TaskError, WeightsError: see :func:`read_task_labels`
        and :func:`balancedmix.schedules.validate_weights`; also for bad sizes, an empty declared
        task, or ``prompts_per_batch < min_per_task * num_tasks``.
    """

    def __init__(
        self,
        dataset: Any,
        task_key: TaskKey = "task",
        weights: Union[None, Mapping[str, float], MixtureSchedule, Any] = None,
        prompts_per_batch: int = 1,
        num_generations: int = 1,
        repeat_count: int = 1,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        *,
        rounding: str = "largest_remainder",
        min_per_task: int = 0,
        homogeneous: bool = False,
        micro_batch_size: int | None = None,
        num_batches: int | None = None,
    ) -> None:
        for name, value, low in (
            ("prompts_per_batch", prompts_per_batch, 1),
            ("num_generations", num_generations, 1),
            ("repeat_count", repeat_count, 1),
            ("min_per_task", min_per_task, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if rounding not in ("largest_remainder", "multinomial"):
            raise ValueError(f"rounding must be 'largest_remainder' or 'multinomial', got {rounding!r}")
        if homogeneous and (micro_batch_size is None or isinstance(micro_batch_size, bool) or micro_batch_size < 1):
            raise ValueError("homogeneous=True needs micro_batch_size, the number of indices per micro-batch (>= 1)")
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")

        self.registry = TaskRegistry(tasks)
        names = read_task_labels(dataset, task_key, self.registry)
        self.tasks: tuple[str, ...] = self.registry.names
        k = len(self.tasks)
        rows: list[list[int]] = [[] for _ in range(k)]
        for i, name in enumerate(names):
            rows[self.registry.index(name)].append(i)
        for t, r in zip(self.tasks, rows):
            if not r:
                raise TaskError(f"task {t!r} has no rows in the dataset; remove it from tasks= or add prompts")
        self._rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.task_sizes: dict[str, int] = {t: len(r) for t, r in zip(self.tasks, rows)}
        if prompts_per_batch < min_per_task * k:
            raise ValueError(
                f"prompts_per_batch={prompts_per_batch} is smaller than min_per_task={min_per_task} x {k} tasks "
                f"{list(self.tasks)}; raise prompts_per_batch or lower min_per_task"
            )

        self.task_key = task_key
        self.prompts_per_batch = prompts_per_batch
        self.num_generations = num_generations
        self.repeat_count = repeat_count
        self.seed = seed
        self.rounding = rounding
        self.min_per_task = min_per_task
        self.homogeneous = bool(homogeneous)
        self.micro_batch_size = micro_batch_size
        self.num_rows = len(names)
        self.num_batches = num_batches if num_batches is not None else max(1, self.num_rows // prompts_per_batch)

        self.schedule = as_schedule(weights)
        self.schedule.bind(self.tasks, self.task_sizes)
        validate_weights(self.schedule.weights(0), self.tasks, where=f"{self.schedule!r}.weights(0)")

        self._history_idx: list[int] = []  # batch indices where the weights changed
        self._history: list[tuple[int, ...]] = []  # integer weights from that batch on
        self._frontier = 0  # batches drawn so far (their weights are in the history)
        self._epoch = 0
        self._resume_offset = 0
        self._offset = 0  # indices yielded in the current epoch
        self._anchor: tuple[int, _Stream] = (0, _Stream(k))
        self._last: tuple[int, _Stream] = (0, _Stream(k))
        self._perm_cache: dict[int, tuple[tuple[int, tuple[int, ...]], np.ndarray]] = {}

    # ------------------------------------------------------------------ public read-only views
    def __len__(self) -> int:
        """Indices per sampler epoch: ``num_batches * prompts_per_batch * num_generations * repeat_count``."""
        return self.num_batches * self.prompts_per_batch * self.num_generations * self.repeat_count

    @property
    def batch_length(self) -> int:
        """Indices per batch, ``B * G * R``."""
        return self.prompts_per_batch * self.num_generations * self.repeat_count

    @property
    def task_epochs(self) -> dict[str, int]:
        """Completed passes over each task's prompts, as of the last batch drawn.

        The DataLoader reads ahead of training, so this runs ahead of the trained batches.
        """
        state = self._last[1]
        return {
            t: state.epochs[i] + (1 if state.positions[i] == len(self._rows[i]) else 0) for i, t in enumerate(self.tasks)
        }

    @property
    def current_weights(self) -> dict[str, float]:
        """Normalised weights (sum 1) of the last batch drawn, or of batch 0 if none was drawn."""
        if self._history:
            w = self._history[-1]
        else:
            w = _integer_weights(validate_weights(self.schedule.weights(0), self.tasks), self.tasks)
        return self._probs(w)

    @property
    def weights_history(self) -> list[tuple[int, dict[str, float]]]:
        """``(batch_index, normalised weights)`` at every batch where the weights changed.

        The weights of batch ``b`` are those of the last entry with ``batch_index <= b``.
        """
        return [(b, self._probs(w)) for b, w in zip(self._history_idx, self._history)]

    @property
    def batches_drawn(self) -> int:
        """Number of batches drawn so far (the read position, ahead of training)."""
        return self._frontier

    def metrics(self) -> dict[str, float]:
        """Flat dict for loggers: ``mixture/weight/<task>``, ``mixture/task_epochs/<task>``, ``mixture/batches_drawn``."""
        out = {f"mixture/weight/{t}": w for t, w in self.current_weights.items()}
        out.update({f"mixture/task_epochs/{t}": float(e) for t, e in self.task_epochs.items()})
        out["mixture/batches_drawn"] = float(self._frontier)
        return out

    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields sampler epoch ``epoch`` from its start (like ``DistributedSampler``).

        Without calls to ``set_epoch``, each completed iteration moves on to the next epoch.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        self._resume_offset = 0
        self._offset = 0

    # ------------------------------------------------------------------ the stream
    def _probs(self, w: tuple[int, ...]) -> dict[str, float]:
        total = sum(w)
        return {t: w[i] / total for i, t in enumerate(self.tasks)}

    def _weights_for(self, b: int) -> tuple[int, ...]:
        if b < self._frontier:
            return self._history[bisect.bisect_right(self._history_idx, b) - 1]
        if b > self._frontier:  # the replay in _state_at always visits batches in order
            raise RuntimeError(f"batch {b} requested before batch {self._frontier}; batches are drawn in order")
        full = validate_weights(self.schedule.weights(b), self.tasks, where=f"{self.schedule!r}.weights({b})")
        w = _integer_weights(full, self.tasks)
        if not self._history or self._history[-1] != w:
            self._history_idx.append(b)
            self._history.append(w)
            logger.debug("mixture weights from batch %d: %s", b, self._probs(w))
        self._frontier = b + 1
        return w

    def _perm(self, t: int, epoch: int, moved: tuple[int, ...]) -> np.ndarray:
        key = (epoch, moved)
        hit = self._perm_cache.get(t)
        if hit is not None and hit[0] == key:
            return hit[1]
        rng = np.random.default_rng([self.seed % (1 << 64), _PERM, t, epoch])
        perm = rng.permutation(len(self._rows[t]))
        if moved:
            back = np.isin(perm, np.asarray(moved, dtype=np.int64))
            perm = np.concatenate([perm[~back], perm[back]])
        self._perm_cache[t] = (key, perm)
        return perm

    def _counts(self, b: int, state: _Stream, w: tuple[int, ...]) -> list[int]:
        """Prompts per task in batch ``b``; updates ``state.deficits`` (quota rounding)."""
        k = len(self.tasks)
        positive = [i for i in range(k) if w[i] > 0]
        counts = [self.min_per_task if w[i] > 0 else 0 for i in range(k)]
        free = self.prompts_per_batch - self.min_per_task * len(positive)
        if self.rounding == "multinomial":
            total = sum(w)
            p = np.array([wi / total for wi in w], dtype=np.float64)
            rng = np.random.default_rng([self.seed % (1 << 64), _MULTI, b])
            drawn = rng.multinomial(free, p / p.sum())
            return [c + int(d) for c, d in zip(counts, drawn)]
        q = sum(w)
        d = state.deficits
        if state.weights != w:
            d = self._convert_deficits(state, w)
        for _ in range(free):
            best = -1
            for i in positive:
                d[i] += w[i]
            for i in positive:
                # eligible: below its upper quota; priority: earliest deadline (q - d_i) / w_i
                if d[i] > 0 and (best < 0 or (q - d[i]) * w[best] < (q - d[best]) * w[i]):
                    best = i
            d[best] -= q
            counts[best] += 1
        state.deficits = d
        state.weights = w
        return counts

    @staticmethod
    def _convert_deficits(state: _Stream, w: tuple[int, ...]) -> list[int]:
        """Re-express the deficits in the units of new weights ``w``; zero-weight tasks drop theirs."""
        k = len(w)
        q_new = sum(w)
        if state.weights is None:
            return [0] * k
        q_old = sum(state.weights)
        d = [((2 * di * q_new + q_old) // (2 * q_old)) if w[i] > 0 else 0 for i, di in enumerate(state.deficits)]
        residual = -sum(d)  # keep sum(d) == 0
        if residual:
            shares = [residual * w[i] // q_new for i in range(k)]
            left = residual - sum(shares)
            for i in range(k):
                d[i] += shares[i]
            i = 0
            while left:
                if w[i % k] > 0:
                    d[i % k] += 1 if left > 0 else -1
                    left += -1 if left > 0 else 1
                i += 1
        return d

    def _take(self, t: int, state: _Stream, count: int, out: list[int] | None) -> None:
        """Take ``count`` prompts of task ``t`` from its permutations (advances ``state``)."""
        n = len(self._rows[t])
        epoch, pos, moved = state.epochs[t], state.positions[t], state.moved[t]
        used: list[np.ndarray] = []
        while count > 0:
            if pos == n:
                taken = np.concatenate(used) if used else np.empty(0, dtype=np.int64)
                epoch, pos = epoch + 1, 0
                moved = tuple(sorted(set(taken.tolist()))) if 0 < len(taken) < n else ()
            perm = self._perm(t, epoch, moved)
            step = min(count, n - pos)
            chunk = perm[pos : pos + step]
            used.append(chunk)
            pos += step
            count -= step
        if out is not None and used:
            out.extend(self._rows[t][np.concatenate(used)].tolist())
        state.epochs[t], state.positions[t], state.moved[t] = epoch, pos, moved

    def _draw(self, b: int, state: _Stream, materialise: bool = True) -> list[int] | None:
        """Batch ``b``'s B dataset indices in stream order; advances ``state`` in place."""
        w = self._weights_for(b)
        counts = self._counts(b, state, w)
        if not materialise:
            for t, c in enumerate(counts):
                self._take(t, state, c, None)
            return None
        per_task: list[list[int]] = []
        for t, c in enumerate(counts):
            chosen: list[int] = []
            self._take(t, state, c, chosen)
            per_task.append(chosen)
        rng = np.random.default_rng([self.seed % (1 << 64), _ORDER, b])
        if self.homogeneous:
            assert self.micro_batch_size is not None
            runs = homogeneous_order(counts, self.num_generations, self.micro_batch_size, rng)
            cursor = [0] * len(counts)
            prompts: list[int] = []
            for t, c in runs:
                prompts.extend(per_task[t][cursor[t] : cursor[t] + c])
                cursor[t] += c
            return prompts
        flat = [i for chosen in per_task for i in chosen]
        return [flat[j] for j in rng.permutation(len(flat))]

    def _state_at(self, batch: int) -> _Stream:
        """Stream state at the start of ``batch`` (replays counts from the nearest known point)."""
        start, state = self._anchor if self._anchor[0] <= batch else (0, _Stream(len(self.tasks)))
        if self._last[0] <= batch and self._last[0] > start:
            start, state = self._last
        state = state.copy()
        for b in range(start, batch):
            self._draw(b, state, materialise=False)
        return state

    def __iter__(self) -> Iterator[int]:
        epoch = self._epoch
        offset = self._resume_offset
        self._resume_offset = 0
        first = epoch * self.num_batches
        state = self._state_at(first)
        self._anchor = (first, state.copy())
        per_batch = self.batch_length
        skip_batches, skip = divmod(offset, per_batch)
        g, r = self.num_generations, self.repeat_count
        self._offset = 0
        for j in range(self.num_batches):
            b = first + j
            if j < skip_batches:
                self._draw(b, state, materialise=False)
                self._last = (b + 1, state.copy())
                self._offset = (j + 1) * per_batch
                continue
            prompts = self._draw(b, state)
            self._last = (b + 1, state.copy())
            start = skip if j == skip_batches else 0
            self._offset = j * per_batch + start
            # lazily: B prompts, each G times, the block R times (never the B*G*R list)
            rep, rest = divmod(start, len(prompts) * g)  # type: ignore[arg-type]
            first_prompt, first_copy = divmod(rest, g)
            for _ in range(rep, r):
                for p in range(first_prompt, len(prompts)):  # type: ignore[arg-type]
                    index = prompts[p]  # type: ignore[index]
                    for _ in range(first_copy, g):
                        self._offset += 1
                        yield index
                    first_copy = 0
                first_prompt = 0
        self._epoch = epoch + 1
        self._offset = 0

    # ------------------------------------------------------------------ checkpointing
    def _config(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "task_sizes": dict(self.task_sizes),
            "prompts_per_batch": self.prompts_per_batch,
            "num_generations": self.num_generations,
            "repeat_count": self.repeat_count,
            "seed": self.seed,
            "rounding": self.rounding,
            "min_per_task": self.min_per_task,
            "homogeneous": self.homogeneous,
            "micro_batch_size": self.micro_batch_size,
            "num_batches": self.num_batches,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact stream: position, weight history, schedule state.

        ``epoch``/``offset`` are the read position (indices yielded in the current epoch). Plain
        Python values (JSON-friendly: big integers are strings).
        """
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "offset": self._offset,
            "frontier": self._frontier,
            "history": [[b, [str(x) for x in w]] for b, w in zip(self._history_idx, self._history)],
            "anchor": [self._anchor[0], self._anchor[1].to_dict()],
            "last": [self._last[0], self._last[1].to_dict()],
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The next iteration continues at the saved position.

        Calling :meth:`set_epoch` afterwards instead restarts that epoch from its beginning; the
        batches drawn before the save keep their recorded weights, so the epoch is replayed
        exactly (this is what the HF Trainer's resume, which skips the trained batches, needs).

        Raises:
            TaskError: the state comes from a sampler with a different configuration (naming the
                differing fields) or an unknown version.
        """
        if state.get("version") != _STATE_VERSION:
            raise TaskError(f"unknown MixtureSampler state version {state.get('version')!r}")
        saved, mine = state["config"], self._config()
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs {mine[k]!r}" for k in diff)
            raise TaskError(f"MixtureSampler state does not match this sampler ({details})")
        self._history_idx = [int(b) for b, _ in state["history"]]
        self._history = [tuple(int(x) for x in w) for _, w in state["history"]]
        self._frontier = int(state["frontier"])
        self._anchor = (int(state["anchor"][0]), _Stream.from_dict(state["anchor"][1]))
        self._last = (int(state["last"][0]), _Stream.from_dict(state["last"][1]))
        self._epoch = int(state["epoch"])
        self._resume_offset = int(state["offset"])
        self._offset = self._resume_offset
        self.schedule.load_state_dict(state["schedule"])

    def __repr__(self) -> str:
        return (
            f"MixtureSampler(tasks={list(self.tasks)}, B={self.prompts_per_batch}, G={self.num_generations}, "
            f"R={self.repeat_count}, schedule={self.schedule!r}, rounding={self.rounding!r}, "
            f"num_batches={self.num_batches})"
        )
