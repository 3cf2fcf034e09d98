"""Task labels of the TRL integration: streaming datasets, ClassLabel columns, callable keys
(issue 14, items 21 and 22). Same tiny in-code model as tests/test_trl.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import ClassLabel, Features, IterableDataset, Value  # noqa: E402

from balancedmix.demo.toy import build_char_tokenizer  # noqa: E402
from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer  # noqa: E402
from balancedmix.tasks import TaskError, UnknownTaskError  # noqa: E402
from test_trl import make_dataset, make_trainer  # noqa: E402

TASKS = ["add", "copy", "rev"]
FEATURES = Features({"prompt": Value("string"), "task": Value("string"), "answer": Value("string")})


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


class Counter:
    def __init__(self) -> None:
        self.reads = 0


def counting_stream(counter: Counter, limit: int | None = None) -> IterableDataset:
    """An HF streaming dataset with a known schema (column_names set) that counts the rows read;
    with ``limit`` it raises after that many rows instead of running forever."""
    base = make_dataset().to_list()

    def gen():
        while True:  # endless with a limit, one pass without
            for row in base:
                counter.reads += 1
                if limit is not None and counter.reads > limit:
                    raise RuntimeError(f"read more than {limit} rows of the stream")
                yield dict(row)
            if limit is None:
                return

    return IterableDataset.from_generator(gen, features=FEATURES)


# ------------------------------------------------------------------------------ item 21: streaming
def test_streaming_dataset_with_declared_tasks_is_not_read_at_construction(tok, tmp_path):
    counter = Counter()
    stream = counting_stream(counter)
    assert stream.column_names == ["prompt", "task", "answer"]
    trainer = make_trainer(BalancedGRPOTrainer, tok, tmp_path, dataset=stream, balanced=BalancedConfig(tasks=TASKS))
    assert counter.reads == 0
    assert trainer.task_registry.names == tuple(TASKS)
    trainer.train()  # trains from the stream (3 steps of 4 prompts)
    assert 0 < counter.reads <= 2 * len(make_dataset())
    assert trainer.last_balanced_metrics is not None


def test_endless_stream_without_tasks_is_a_clear_error_not_a_hang(tok, tmp_path):
    counter = Counter()
    stream = counting_stream(counter, limit=1000)
    with pytest.raises(TaskError, match=r"streaming .*declare them with BalancedConfig\(tasks="):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path, dataset=stream)
    assert counter.reads == 0


def test_schedule_with_a_streaming_dataset_is_refused(tok, tmp_path):
    counter = Counter()
    with pytest.raises(ValueError, match="schedule=.*map-style train_dataset"):
        make_trainer(
            BalancedGRPOTrainer, tok, tmp_path, dataset=counting_stream(counter),
            balanced=BalancedConfig(tasks=TASKS, schedule={"add": 1.0, "copy": 1.0, "rev": 1.0}),
        )
    assert counter.reads == 0


# ------------------------------------------------------------------------------ item 22: ClassLabel
CLASS_ORDER = ["rev", "add", "copy"]  # deliberately not the declared/sorted task order


def class_label_dataset():
    return make_dataset().cast_column("task", ClassLabel(names=CLASS_ORDER))


class Recording(BalancedGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.seen = getattr(self, "seen", [])
        self.seen.append(([r["prompt"] for r in inputs], [self.task_registry.name(int(i)) for i in out["task_ids"]]))
        return out


PROMPT_TASK = {r["prompt"]: r["task"] for r in make_dataset().to_list()}


def length_reward(prompts, completions, **kwargs):
    """Ignores the task column (whose values are ClassLabel integers here)."""
    return [0.1 * len(c) + 0.05 * len(p) for p, c in zip(prompts, completions)]


@pytest.mark.parametrize("tasks", [TASKS, None])
def test_class_label_task_column_is_decoded_with_its_names(tok, tmp_path, tasks):
    trainer = make_trainer(
        Recording, tok, tmp_path, dataset=class_label_dataset(), reward=length_reward, balanced=BalancedConfig(tasks=tasks), max_steps=2
    )
    assert trainer.task_registry.names == tuple(tasks or CLASS_ORDER)  # default: the ClassLabel's order
    trainer.train()
    assert trainer.seen
    for prompts, names in trainer.seen:
        assert names == [PROMPT_TASK[p] for p in prompts]


def test_class_label_task_column_with_schedule(tok, tmp_path):
    trainer = make_trainer(
        Recording, tok, tmp_path, dataset=class_label_dataset(), reward=length_reward, max_steps=2,
        balanced=BalancedConfig(tasks=TASKS, schedule={"add": 0.0, "copy": 1.0, "rev": 0.0}),
    )
    trainer.train()
    assert trainer.mixture_sampler is not None
    for prompts, names in trainer.seen:
        assert {PROMPT_TASK[p] for p in prompts} == {"copy"}
        assert set(names) == {"copy"}


def test_class_label_undeclared_class_is_a_clear_error(tok, tmp_path):
    with pytest.raises(UnknownTaskError, match="not declared"):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path, dataset=class_label_dataset(), balanced=BalancedConfig(tasks=["add", "copy"]))


# ------------------------------------------------------------------------------ item 22: callable key
def rows_to_tasks(rows):
    """BalancedConfig.task_key's signature: TRL's list of row dicts -> one label per row."""
    assert isinstance(rows, list), f"task_key must receive a list of rows, got {type(rows).__name__}"
    return [r["task"] for r in rows]


def test_callable_task_key_with_schedule(tok, tmp_path):
    trainer = make_trainer(
        Recording, tok, tmp_path, max_steps=2,
        balanced=BalancedConfig(task_key=rows_to_tasks, tasks=TASKS, schedule={"add": 1.0, "copy": 0.0, "rev": 0.0}),
    )
    trainer.train()
    assert trainer.mixture_sampler is not None
    for prompts, names in trainer.seen:
        assert {PROMPT_TASK[p] for p in prompts} == {"add"}
        assert set(names) == {"add"}
    torch.testing.assert_close(trainer.last_balanced_metrics["num_samples/add"], 16.0)


def test_class_label_column_of_a_stream_is_decoded_without_reading_it(tok, tmp_path):
    counter = Counter()
    base = class_label_dataset()

    def gen():
        for row in base.to_list():
            counter.reads += 1
            yield row

    stream = IterableDataset.from_generator(gen, features=base.features)
    trainer = make_trainer(
        Recording, tok, tmp_path, dataset=stream, reward=length_reward, max_steps=2, balanced=BalancedConfig(tasks=TASKS)
    )
    assert counter.reads == 0
    trainer.train()
    assert trainer.seen
    for prompts, names in trainer.seen:
        assert names == [PROMPT_TASK[p] for p in prompts]
