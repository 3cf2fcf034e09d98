import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from balancedmix.tasks import (
    MissingTaskLabelError,
    MixedTaskBatchError,
    TaskError,
    TaskRegistry,
    UnknownTaskError,
    resolve_task,
    task_labels,
)


def test_labels_from_dict_column():
    assert task_labels({"task": ["a", "a", "b"], "x": 1}, "task") == ["a", "a", "b"]
    assert task_labels({"task": "a"}, "task") == ["a"]


def test_labels_from_batch_encoding():
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": torch.zeros(2, 3), "task": ["m", "m"]})
    assert resolve_task(enc, "task") == "m"


def test_labels_from_list_of_rows_and_callable():
    rows = [{"task": "a", "p": 1}, {"task": "a", "p": 2}]
    assert resolve_task(rows, "task") == "a"
    assert resolve_task(rows, lambda b: b[0]["task"]) == "a"


def test_integer_labels_map_through_registry():
    reg = TaskRegistry(["math", "code"])
    assert task_labels({"task_ids": torch.tensor([1, 1, 0])}, "task_ids", reg) == ["code", "code", "math"]
    with pytest.raises(TaskError, match="registry"):
        task_labels({"t": [0]}, "t")
    with pytest.raises(UnknownTaskError, match="out of range"):
        task_labels({"t": torch.tensor([5])}, "t", reg)


def test_explicit_name_is_returned_as_is():
    assert resolve_task("code", "task") == "code"


def test_mixed_batch_error_names_tasks_and_counts():
    with pytest.raises(MixedTaskBatchError) as err:
        resolve_task({"task": ["a", "b", "a"]}, "task")
    msg = str(err.value)
    assert "'a': 2" in msg and "'b': 1" in msg and "backward" in msg


def test_missing_key_errors_name_the_key():
    with pytest.raises(MissingTaskLabelError, match="'task'"):
        resolve_task({"x": 1}, "task")
    with pytest.raises(MissingTaskLabelError, match="row 1"):
        resolve_task([{"task": "a"}, {"x": 1}], "task")
    with pytest.raises(MissingTaskLabelError, match="empty"):
        resolve_task({"task": []}, "task")
    with pytest.raises(MissingTaskLabelError, match="type int"):
        resolve_task(3, "task")


def test_bad_label_types():
    with pytest.raises(TaskError, match="bool"):
        task_labels({"task": True}, "task", TaskRegistry(["a"]))
    with pytest.raises(TaskError, match="float"):
        task_labels({"task": 1.5}, "task")


def test_registry_declared_is_closed():
    reg = TaskRegistry(["a", "b"])
    assert reg.index("b") == 1
    with pytest.raises(UnknownTaskError, match="unknown task 'c'.*declared tasks are \\['a', 'b'\\]"):
        reg.index("c")
    with pytest.raises(TaskError, match="twice"):
        TaskRegistry(["a", "a"])
    with pytest.raises(TaskError, match="no task"):
        TaskRegistry([])


@given(st.lists(st.sampled_from(["x", "y", "z", "w"]), min_size=1, max_size=30))
def test_open_registry_indices_follow_first_sight(names):
    reg = TaskRegistry()
    for n in names:
        reg.index(n)
    first_seen = list(dict.fromkeys(names))
    assert reg.names == tuple(first_seen)
    assert [reg.index(n) for n in first_seen] == list(range(len(first_seen)))


def test_registry_state_round_trip():
    reg = TaskRegistry()
    for n in ["b", "a"]:
        reg.index(n)
    other = TaskRegistry()
    other.load_state_dict(reg.state_dict())
    assert other.names == ("b", "a") and not other.declared
    declared = TaskRegistry(["a", "b"])
    with pytest.raises(TaskError, match="differs"):
        declared.load_state_dict({"names": ["b", "a"], "declared": True})
