"""Single-task micro-batches by construction (issue 17 item 1).

* ``MixtureSampler(quota_unit=u, shards=P)``: every task's count in every batch is a multiple of
  ``u``, every one of the ``P`` consecutive segments of a batch holds the same count of every task,
  and the realised task frequencies stay within one unit of the weights (the quota bound of
  prompt-level rounding, in units); the default stream is unchanged; old states still load.
* ``BalancedGRPOTrainer(homogeneous="auto")``: where the batch geometry allows, no micro-batch
  mixes tasks (no split forward); where it does not, the reason and its fix are logged once and
  mixed micro-batches are split as before; ``homogeneous=True`` raises instead.
* 2 gloo processes (DDP and FSDP2): the task of each micro-step is the same on every rank.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix.sampler import MixtureSampler


def _rows(sizes: list[int]) -> list[dict[str, str]]:
    return [{"task": f"t{k}"} for k, n in enumerate(sizes) for _ in range(n)]


def _batches(sampler: MixtureSampler, rows: list[dict[str, str]]) -> list[list[str]]:
    """The task of each of a batch's B prompts, per batch (checks the G-copies structure on the way)."""
    g, b, r = sampler.num_generations, sampler.prompts_per_batch, sampler.repeat_count
    stream = list(sampler)
    out = []
    for j in range(0, len(stream), b * g * r):
        block = stream[j : j + b * g]
        assert stream[j : j + b * g * r] == block * r
        prompts = block[::g]
        assert block == [i for i in prompts for _ in range(g)]  # a GRPO group is G consecutive copies
        out.append([rows[i]["task"] for i in prompts])
    return out


# ------------------------------------------------------------------------------------------ sampler
@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    raw_weights=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    units=st.integers(1, 4),
    shards=st.sampled_from([1, 2, 3]),
    per_shard=st.integers(1, 2),
    gens=st.integers(1, 3),
    num_batches=st.integers(1, 7),
    seed=st.integers(0, 2**31),
    rounding=st.sampled_from(["largest_remainder", "multinomial"]),
    homogeneous=st.booleans(),
)
def test_quota_units_shards_and_frequencies(sizes, raw_weights, units, shards, per_shard, gens, num_batches, seed, rounding, homogeneous):
    """Counts are whole units, every shard holds the same counts, and after h units every task's
    cumulative count N_t is within one unit of its share: floor(h p_t) u <= N_t <= ceil(h p_t) u
    (prompt-level rounding, u = 1, keeps floor(h p_t) <= N_t <= ceil(h p_t) — the same bound).
    Multinomial rounding draws whole units; the per-shard order may be the homogeneous one."""
    k = len(sizes)
    weights = {f"t{i}": w for i, w in enumerate(raw_weights[:k])}
    if sum(weights.values()) == 0:
        weights["t0"] = 1
    unit = shards * per_shard
    rows = _rows(sizes)
    sampler = MixtureSampler(
        rows, weights=weights, prompts_per_batch=units * unit, num_generations=gens, repeat_count=2,
        seed=seed, num_batches=num_batches, quota_unit=unit, shards=shards, rounding=rounding,
        homogeneous=homogeneous, micro_batch_size=gens * per_shard if homogeneous else None,
    )  # fmt: skip
    total = sum(weights.values())
    cumulative: Counter[str] = Counter()
    for h, tasks in enumerate(_batches(sampler, rows), start=1):
        counts = Counter(tasks)
        assert all(c % unit == 0 for c in counts.values()), counts
        seg = len(tasks) // shards
        for s in range(shards):
            assert Counter(tasks[s * seg : (s + 1) * seg]) == Counter({t: c // shards for t, c in counts.items()})
        cumulative.update(counts)
        if rounding == "multinomial":  # drawn counts (in whole units): no frequency bound
            continue
        for t, w in weights.items():
            share = Fraction(h * units * w, total)  # units owed to t after h batches
            assert math.floor(share) * unit <= cumulative[t] <= math.ceil(share) * unit, (t, h, cumulative, weights)


def test_sharded_homogeneous_order_gives_single_task_micro_batches():
    """A plain loop reading shard s of each batch in micro-batches of 4 indices (2 prompts x G=2):
    with quotas in units of 2 prompts per shard, every micro-batch holds one task."""
    rows = _rows([7, 5, 4])
    sampler = MixtureSampler(
        rows, prompts_per_batch=8, num_generations=2, seed=5, num_batches=9, quota_unit=4, shards=2,
        homogeneous=True, micro_batch_size=4,
    )  # fmt: skip
    stream = list(sampler)
    for start in range(0, len(stream), 4):
        assert len({rows[i]["task"] for i in stream[start : start + 4]}) == 1, start


def test_min_per_task_is_rounded_up_to_whole_units():
    rows = _rows([5, 5, 5])
    sampler = MixtureSampler(rows, weights={"t0": 10, "t1": 1, "t2": 1}, prompts_per_batch=6, quota_unit=2, min_per_task=1, num_batches=4)
    for tasks in _batches(sampler, rows):
        assert Counter(tasks) == {"t0": 2, "t1": 2, "t2": 2}
    with pytest.raises(ValueError, match="quota_unit=2"):
        MixtureSampler(rows, prompts_per_batch=4, quota_unit=2, min_per_task=1)  # 3 tasks x 1 unit > 2 units


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(prompts_per_batch=6, quota_unit=4), "must divide prompts_per_batch"), (dict(prompts_per_batch=6, quota_unit=3, shards=2), "multiple of shards"),
     (dict(prompts_per_batch=4, quota_unit=0), "quota_unit must be an int >= 1"), (dict(prompts_per_batch=4, shards=True), "shards must be an int")],
)  # fmt: skip
def test_bad_quota_unit_or_shards_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureSampler(_rows([3, 3]), **kwargs)


# indices of a stream drawn by the sampler before quota_unit/shards existed (the same call): the
# default stream, and so every saved run's replay, is unchanged
_GOLDEN = [2, 10, 4, 1, 2, 10, 4, 1, 7, 5, 12, 0, 7, 5, 12, 0, 14, 2, 3, 6, 14, 2, 3, 6, 0, 5, 9, 13, 0, 5, 9, 13]


def test_default_stream_is_unchanged():
    rows = [{"task": t} for t in ["a"] * 7 + ["b"] * 5 + ["c"] * 3]
    sampler = MixtureSampler(rows, weights={"a": 3, "b": 1, "c": 1}, prompts_per_batch=4, num_generations=2, repeat_count=2, seed=3, num_batches=6)
    assert list(sampler)[::2][: len(_GOLDEN)] == _GOLDEN


def test_state_without_the_new_keys_still_loads_and_replays():
    rows = _rows([6, 4, 3])
    make = lambda **kw: MixtureSampler(rows, prompts_per_batch=4, num_generations=2, seed=1, num_batches=5, **kw)  # noqa: E731
    a = make()
    it = iter(a)
    head = [next(it) for _ in range(13)]
    state = a.state_dict()
    for key in ("quota_unit", "shards"):  # a state written before these keys existed
        del state["config"][key]
    b = make()
    b.load_state_dict(state)
    assert head + list(b) == list(make())
    with pytest.raises(Exception, match="quota_unit"):
        make(quota_unit=2).load_state_dict(state)
    c = make(quota_unit=2, shards=2)
    c.load_state_dict(c.state_dict())  # the new keys round-trip


# ------------------------------------------------------------------------------------------ the plan
class _Stream(__import__("torch").utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def _plan(b=8, g=4, spg=2, ga=2, procs=1, k=3, reorder=None, homogeneous="auto", streaming=False, shuffle=True):
    from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOMixin
    from balancedmix.tasks import TaskRegistry

    stub = SimpleNamespace(
        balanced=BalancedConfig(homogeneous=homogeneous),
        task_registry=TaskRegistry([f"t{i}" for i in range(k)]),
        args=SimpleNamespace(per_device_train_batch_size=b, steps_per_generation=spg, gradient_accumulation_steps=ga),
        num_generations=g,
        accelerator=SimpleNamespace(num_processes=procs),
        _bm_reorder_reason=reorder,
        train_dataset=_Stream() if streaming else [],
        shuffle_dataset=shuffle,
    )
    return BalancedGRPOMixin._bm_plan_homogeneous(stub)


@pytest.mark.parametrize(
    "geometry, unit",
    [
        (dict(), 2),  # demo: micro-batch = 2 groups, 2 micro-batches per step
        (dict(procs=2), 4),  # 2 processes: each rank gets 2 of a unit's 4 prompts
        (dict(b=6, g=4, spg=4, ga=4), 3),  # lcm(6, 4) = 12 rows = 2 micro-batches = 3 groups
        (dict(b=2, g=4, spg=4, ga=4), 1),  # a group spans 2 micro-batches: one prompt per unit
        (dict(spg=2, ga=4), 2),  # two generation batches per optimizer step: the window is one of them
        (dict(b=8, g=8, spg=1, ga=1), 1),  # one prompt per generation batch: nothing to mix
    ],
)
def test_plan_when_the_geometry_allows(geometry, unit):
    assert _plan(**geometry) == (unit, None)


@pytest.mark.parametrize(
    "geometry, fix",
    [
        (dict(spg=4, ga=2), "set steps_per_generation equal to gradient_accumulation_steps"),
        (dict(b=2, g=4, spg=1, ga=1, procs=2), "set per_device_train_batch_size to a multiple of num_generations"),
        (dict(b=6, g=4, spg=2, ga=2), "raise gradient_accumulation_steps"),
        (dict(reorder="loss_type='bnpo' normalises by each micro-batch's own token count"), "loss_type='bnpo'"),
        (dict(streaming=True), "load it map-style"),
        (dict(shuffle=False), "shuffle_dataset=False"),
    ],
)
def test_plan_falls_back_naming_the_fix(geometry, fix):
    unit, reason = _plan(**geometry)
    assert unit is None and fix in reason


def test_plan_off_or_single_task():
    assert _plan(homogeneous=False) == (None, None)
    assert _plan(k=1, spg=4, ga=2) == (None, None)  # one task: nothing ever mixes, nothing to say


# ------------------------------------------------------------------------------------------ trainer
pytest.importorskip("trl")


def _recording_trainer_class():
    import torch

    from balancedmix.integrations.trl import TASK_IDS_KEY, BalancedGRPOTrainer

    class Recording(BalancedGRPOTrainer):
        """Records the tasks of every training micro-batch handed to compute_loss."""

        def __init__(self, *args, **kwargs):
            self.micro_tasks: list[list[int]] = []
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.model.training and torch.is_grad_enabled():
                self.micro_tasks.append(sorted(set(inputs[TASK_IDS_KEY].tolist())))
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def _messages(caplog, needle):
    return [r for r in caplog.records if r.name == "balancedmix.integrations.trl" and needle in r.getMessage()]


def test_trainer_micro_batches_are_single_task(tmp_path, caplog):
    import test_trl as tt

    caplog.set_level(logging.INFO, logger="balancedmix")
    trainer = tt.make_trainer(_recording_trainer_class(), tt.build_char_tokenizer(), tmp_path, max_steps=4, method="pcgrad")
    trainer.train()
    assert trainer.mixture_sampler is not None and trainer.mixture_sampler.quota_unit == 2
    assert len(trainer.micro_tasks) == 8 and all(len(t) == 1 for t in trainer.micro_tasks), trainer.micro_tasks
    steps = [h for h in trainer.state.log_history if "split_microbatches" in h]
    assert len(steps) == 4 and all(h["split_microbatches"] == 0 for h in steps)
    # size-proportional weights (equal task sizes): 8 units over 4 steps, every task 2 or 3 units
    per_task = Counter()
    for h in steps:
        for t in tt.TASKS:
            per_task[t] += h[f"num_samples/{t}"]
    assert sum(per_task.values()) == 64 and all(v in (16.0, 24.0) for v in per_task.values()), per_task
    assert len(_messages(caplog, "single-task micro-batches by construction")) == 1
    assert not _messages(caplog, "split into per-task forwards")


def test_trainer_fallback_is_logged_once_with_the_fix(tmp_path, caplog):
    import test_trl as tt

    caplog.set_level(logging.INFO, logger="balancedmix")
    trainer = tt.make_trainer(
        _recording_trainer_class(), tt.build_char_tokenizer(), tmp_path, max_steps=3, steps_per_generation=4, method="sum"
    )
    trainer.train()
    warned = _messages(caplog, "split into per-task forwards")
    assert len(warned) == 1 and "set steps_per_generation equal to gradient_accumulation_steps" in warned[0].getMessage()
    assert warned[0].levelno == logging.WARNING
    assert trainer.mixture_sampler is None  # TRL's sampler kept
    assert any(len(t) > 1 for t in trainer.micro_tasks)  # mixed micro-batches happen, and are split
    assert sum(h["split_microbatches"] for h in trainer.state.log_history if "split_microbatches" in h) > 0


def test_homogeneous_true_refuses_an_impossible_geometry(tmp_path):
    import test_trl as tt
    from balancedmix.integrations.trl import BalancedGRPOTrainer

    with pytest.raises(ValueError, match="homogeneous=True.*steps_per_generation"):
        tt.make_trainer(BalancedGRPOTrainer, tt.build_char_tokenizer(), tmp_path, steps_per_generation=4, homogeneous=True)
    with pytest.raises(ValueError, match="BalancedConfig.homogeneous"):
        tt.BalancedConfig(homogeneous="yes")


# ------------------------------------------------------------------------------------------ 2 processes
def _rank_worker(rank: int, world: int, fsdp: bool, out: str, method: str) -> dict:
    import test_fsdp2 as tf
    import test_trl as tt

    kwargs = dict(optim="sgd", method=method, log_dir=out + "/logs")
    if fsdp:
        tf._force_fsdp2_in_trainer()
        kwargs.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    trainer = tt.make_trainer(_recording_trainer_class(), tt.build_char_tokenizer(), __import__("pathlib").Path(out), **kwargs)
    trainer.train()
    return {
        "micro_tasks": trainer.micro_tasks,
        "kind": trainer.balanced_optimizer.distributed.kind,
        "unit": trainer.mixture_sampler.quota_unit,
        "splits": [h["split_microbatches"] for h in trainer.state.log_history if "split_microbatches" in h],
        "samples": [[h[f"num_samples/{t}"] for t in tt.TASKS] for h in trainer.state.log_history if "split_microbatches" in h],
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_run_the_same_task_at_every_micro_step(tmp_path, fsdp):
    """2 gloo processes, 8 rows per device batch, groups of 4, 2 accumulation steps: quotas in units of
    4 prompts (2 per rank), so every micro-batch is single-task and micro-step i has the same task on
    both ranks (FSDP2 then needs no zero-weight blocks; DDP no split)."""
    from dist_harness import run_ranks

    res = run_ranks(_rank_worker, 2, fsdp, str(tmp_path), "normalize", timeout=240)
    assert {r["kind"] for r in res} == {"fsdp2" if fsdp else "ddp"}
    assert res[0]["unit"] == 4
    a, b = res[0]["micro_tasks"], res[1]["micro_tasks"]
    assert len(a) == 6 and a == b and all(len(t) == 1 for t in a), (a, b)
    assert all(s == 0 for r in res for s in r["splits"])
    # both tasks of a step are drawn: 2 units x 4 prompts x 4 generations = 32 rows on the 2 ranks
    assert all(sum(s) == 32 and all(n % 16 == 0 for n in s) for s in res[0]["samples"])
