"""Task labels: resolving which task a batch belongs to, and a stable task registry.

Every sample in multi-task post-training belongs to exactly one task. This module turns the
user's way of saying so (a column name, a callable, an explicit name) into task names, and keeps
the task → index mapping that every other module (buffers, sampler, distributed collectives)
relies on. Task names are strings; they appear verbatim in logs and error messages, and in metric keys
(``grad_norm/<task>``, ``cos/<a>/<b>``, ``reward/<task>/mean``), so a name may not be empty,
contain ``/`` or be one of :data:`RESERVED_TASK_NAMES` (see ``docs/diagnostics.md``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Union

import torch

__all__ = [
    "TaskError",
    "UnknownTaskError",
    "MissingTaskLabelError",
    "MixedTaskBatchError",
    "TaskKey",
    "TaskRegistry",
    "RESERVED_TASK_NAMES",
    "check_task_name",
    "task_labels",
    "resolve_task",
]

TaskKey = Union[str, Callable[[Any], Any]]
"""How to find a batch's task: a key/column name, or a callable ``batch -> label(s)``."""


RESERVED_TASK_NAMES: frozenset[str] = frozenset({"total", "update", "untagged"})
"""Names that metric keys use in a task's place (``grad_norm/total``, ``grad_norm/update``,
``grad_norm/untagged``); a task may not be called so."""


class TaskError(ValueError):
    """Base class of every task-labelling error raised by balancedmix."""


def check_task_name(name: Any) -> str:
    """Return ``name`` if it can be a task name, else raise :class:`TaskError` naming the rule.

    A task name is a non-empty ``str`` without ``/`` (metric keys are ``prefix/<task>[/...]``,
    and ``cos/<a>/<b>`` must split one way only) that is not in :data:`RESERVED_TASK_NAMES`.
    """
    if not isinstance(name, str):
        raise TaskError(f"task name {name!r} is not a str")
    rule = (
        "task names must be non-empty, contain no '/' and not be one of "
        f"{sorted(RESERVED_TASK_NAMES)} (they name metric keys; see docs/diagnostics.md)"
    )
    if not name:
        raise TaskError(f"task name '' is empty; {rule}")
    if "/" in name:
        raise TaskError(f"task name {name!r} contains '/'; {rule}")
    if name in RESERVED_TASK_NAMES:
        raise TaskError(f"task name {name!r} is reserved; {rule}")
    return str(name)


class UnknownTaskError(TaskError, KeyError):
    """A task label that is not in a registry whose task list was declared up front."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MissingTaskLabelError(TaskError):
    """A batch that does not carry the task key."""


class MixedTaskBatchError(TaskError):
    """A batch whose samples belong to several tasks, where one task was required."""


def _as_name(label: Any, registry: TaskRegistry | None) -> str:
    """Normalise one label to a task name. Integers are registry indices."""
    if isinstance(label, torch.Tensor) or _is_array(label):
        size = label.numel() if isinstance(label, torch.Tensor) else label.size
        if size != 1:
            raise TaskError(f"a task label tensor must hold one value, got shape {tuple(label.shape)}")
        label = label.item()
    if isinstance(label, str):
        return str(label)  # numpy.str_ -> str
    if isinstance(label, bool) or type(label).__name__ in ("bool_", "bool"):
        raise TaskError(f"task label {label!r} is a bool; use task names (str)")
    index = _integer(label)
    if index is not None:
        if registry is None:
            raise TaskError(
                f"integer task label {index} needs a task registry to map it to a name "
                "(declare tasks=[...])"
            )
        return registry.name(index)
    raise TaskError(f"task label {label!r} of type {type(label).__name__} is not a str or an int index")


def _is_array(value: Any) -> bool:
    """A numpy array or scalar (duck-typed: numpy need not be imported here)."""
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "tolist")


def _is_scalar_index(value: Any) -> bool:
    """A single integer (Python, numpy, or a one-element integer tensor/array), not a batch."""
    if isinstance(value, torch.Tensor) or _is_array(value):
        return value.numel() == 1 if isinstance(value, torch.Tensor) else value.size == 1
    return _integer(value) is not None


def _integer(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integer type (``int``, ``numpy.int64``, ...), else ``None``."""
    if isinstance(value, (bool, float, complex)) or isinstance(value, str):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def task_labels(batch: Any, task_key: TaskKey, registry: TaskRegistry | None = None) -> list[str]:
    """Per-sample task names of ``batch``.

    Args:
        batch: a mapping (``dict``, ``BatchEncoding``) holding ``task_key``; a sequence of row
            mappings (a list of dicts, TRL's dataloader batch); or anything ``task_key`` accepts
            when it is a callable.
        task_key: the key/column name, or a callable ``batch -> label | sequence of labels``.
        registry: maps integer labels (task indices, e.g. a ``task_ids`` tensor) to names.

    Returns:
        One task name per sample (a single-element list when the batch carries one label).

    Raises:
        MissingTaskLabelError: the batch (or a row of it) has no ``task_key``.
        TaskError: a label is neither a ``str`` nor an integer index.
    """
    if callable(task_key):
        raw = task_key(batch)
    elif isinstance(batch, Mapping):
        if task_key not in batch:
            raise MissingTaskLabelError(
                f"batch has no task key {task_key!r}; its keys are {sorted(map(str, batch.keys()))}"
            )
        raw = batch[task_key]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) > 0 and all(
        isinstance(row, Mapping) for row in batch
    ):
        raw = []
        for i, row in enumerate(batch):
            if task_key not in row:
                raise MissingTaskLabelError(
                    f"row {i} of the batch has no task key {task_key!r}; its keys are {sorted(map(str, row.keys()))}"
                )
            raw.append(row[task_key])
    else:
        raise MissingTaskLabelError(
            f"cannot find task key {task_key!r} in a batch of type {type(batch).__name__}; pass a mapping, "
            "a list of row mappings, a task name, or use a callable task_key"
        )
    if isinstance(raw, torch.Tensor):
        return [_as_name(x, registry) for x in raw.reshape(-1).tolist()]
    if _is_array(raw) and getattr(raw, "ndim", 0) > 0:  # a numpy array of labels
        if raw.size == 0:
            raise MissingTaskLabelError(f"task key {task_key!r} holds an empty array")
        return [_as_name(x, registry) for x in raw.reshape(-1).tolist()]
    if isinstance(raw, (str, int)) or not isinstance(raw, Sequence):
        return [_as_name(raw, registry)]
    if len(raw) == 0:
        raise MissingTaskLabelError(f"task key {task_key!r} holds an empty sequence")
    return [_as_name(x, registry) for x in raw]


def resolve_task(batch_or_name: Any, task_key: TaskKey, registry: TaskRegistry | None = None) -> str:
    """The single task of ``batch_or_name``: a task name (``str``) is returned as is; an integer
    (``int``, ``numpy.int64``, a one-element integer tensor) is a task index of ``registry``
    when one is given, unless ``task_key`` is a callable (which then receives it as the batch).

    Raises:
        MixedTaskBatchError: the batch holds samples of several tasks, naming them and their
            counts. Use ``BalancedOptimizer.backward({task: loss, ...})`` for such batches.
    """
    if isinstance(batch_or_name, str):
        return str(batch_or_name)
    if registry is not None and not callable(task_key) and _is_scalar_index(batch_or_name):
        return _as_name(batch_or_name, registry)
    labels = task_labels(batch_or_name, task_key, registry)
    first = labels[0]
    if any(label != first for label in labels):
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        raise MixedTaskBatchError(
            f"the batch mixes tasks {counts} (task -> samples); one backward must belong to one task. "
            "Split the batch by task, make micro-batches task-homogeneous (MixtureSampler), or pass "
            "per-task losses to BalancedOptimizer.backward({task: loss, ...})"
        )
    return first


class TaskRegistry:
    """Stable task name → index mapping.

    With ``tasks`` declared, the registry is closed: an unknown name raises
    :class:`UnknownTaskError` (this is what distributed runs need, since every rank must agree on
    the index of every task). Without it, tasks are added in order of first sight.
    """

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self.declared = tasks is not None
        if isinstance(tasks, (str, bytes)):
            raise TypeError(
                f"tasks must be a list of task names, got the {type(tasks).__name__} {tasks!r} "
                f"(which would declare one task per character); write tasks=[{tasks!r}]"
            )
        if isinstance(tasks, (set, frozenset)):
            raise TypeError(
                f"tasks must be an ordered sequence of task names, got a {type(tasks).__name__} {tasks!r}: its order "
                "(the task indices) changes between processes; pass a list, e.g. sorted(...)"
            )
        for name in () if tasks is None else tasks:
            if not isinstance(name, str):
                raise TaskError(f"declared task {name!r} is not a str")
            check_task_name(name)
            if name in self._index:
                raise TaskError(f"task {name!r} is declared twice")
            self._add(name)
        if self.declared and not self._names:
            raise TaskError("tasks=[] declares no task; pass at least one name or tasks=None")

    def _add(self, name: str) -> int:
        name = check_task_name(name)
        self._index[name] = len(self._names)
        self._names.append(name)
        return self._index[name]

    def index(self, name: Hashable) -> int:
        """Index of ``name``; adds it when the registry is open."""
        if not isinstance(name, str):
            raise TaskError(f"task name {name!r} is not a str")
        idx = self._index.get(name)
        if idx is not None:
            return idx
        if self.declared:
            raise UnknownTaskError(f"unknown task {name!r}; the declared tasks are {self._names}")
        return self._add(name)

    def name(self, index: int) -> str:
        """Name of the task with index ``index`` (any integer type: ``int``, ``numpy.int64``...)."""
        as_int = _integer(index)
        if as_int is None:
            raise TaskError(f"task index {index!r} of type {type(index).__name__} is not an integer")
        index = as_int
        if not 0 <= index < len(self._names):
            raise UnknownTaskError(f"task index {index} is out of range for tasks {self._names}")
        return self._names[index]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"TaskRegistry({self._names!r}, declared={self.declared})"

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self._names), "declared": self.declared}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = list(state["names"])
        if self.declared and state.get("declared", False) and names != self._names:
            raise TaskError(f"saved task list {names} differs from the declared tasks {self._names}")
        if self.declared and names[: len(self._names)] != self._names:
            raise TaskError(f"saved task list {names} does not start with the declared tasks {self._names}")
        for name in names:  # all checked before anything changes
            check_task_name(name)
        if len(set(names)) != len(names):
            raise TaskError(f"saved task list {names} names a task twice")
        self._names = []
        self._index = {}
        for name in names:
            self._add(name)
        self.declared = bool(state.get("declared", self.declared))
