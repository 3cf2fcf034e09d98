"""Mixture schedules against explicit reference formulas; rank consistency; checkpointing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix.sampler import MixtureSampler
from balancedmix.schedules import (
    Fixed,
    GradientShare,
    LearningProgress,
    SizeProportional,
    Temperature,
    WeightsError,
    WorstTask,
    as_schedule,
)
from balancedmix.tasks import TaskError, UnknownTaskError

FAST = settings(max_examples=40, deadline=None)
NAMES = ("a", "b", "c", "d")


def bound(schedule, sizes):
    tasks = NAMES[: len(sizes)]
    schedule.bind(tasks, dict(zip(tasks, sizes)))
    return schedule


def normalised(w):
    total = math.fsum(w.values())
    return {k: v / total for k, v in w.items()}


@FAST
@given(sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=4), tau=st.floats(0.05, 50))
def test_temperature_matches_reference(sizes, tau):
    p = normalised(bound(Temperature(tau), sizes).weights(0))
    ref = [n ** (1 / tau) for n in sizes]
    for t, r in zip(NAMES, ref):
        assert p[t] == pytest.approx(r / sum(ref), rel=1e-9, abs=1e-300)


def test_size_proportional_and_temperature_limits():
    sizes = [10, 30, 60]
    assert normalised(bound(SizeProportional(), sizes).weights(5)) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert normalised(bound(Temperature(1.0), sizes).weights(0)) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    hot = normalised(bound(Temperature(1e6), sizes).weights(0))
    assert hot == pytest.approx({t: 1 / 3 for t in "abc"}, rel=1e-5)
    cold = normalised(bound(Temperature(0.01), sizes).weights(0))
    assert cold["c"] > 0.999999


def test_fixed_validates_on_bind():
    assert bound(Fixed({"a": 2}), [3, 3]).weights(0) == {"a": 2.0, "b": 0.0}
    with pytest.raises(UnknownTaskError, match="unknown task 'z'"):
        bound(Fixed({"z": 1}), [3, 3])
    with pytest.raises(WeightsError, match="negative"):
        bound(Fixed({"a": -1, "b": 2}), [3, 3])


@settings(max_examples=25, deadline=None)
@given(strength=st.lists(st.floats(0.1, 10), min_size=2, max_size=4), smoothing=st.floats(0, 0.8))
def test_gradient_share_reaches_target(strength, smoothing):
    """Simulated run: task t's share of the update is w_t·a_t / Σ w_s·a_s (gradient ∝ its prompts).

    The fixed point is w_t ∝ target_t / a_t, where every share equals its target.
    """
    k = len(strength)
    tasks = NAMES[:k]
    target = {t: (i + 1) / (k * (k + 1) / 2) for i, t in enumerate(tasks)}
    sched = bound(GradientShare(target=target, floor=0.0, smoothing=smoothing, max_step=4.0), [5] * k)
    for _ in range(150):
        w = normalised(sched.weights(0))
        mass = {t: w[t] * a for t, a in zip(tasks, strength)}
        total = sum(mass.values())
        sched.update({f"update_share/{t}": m / total for t, m in mass.items()})
    w = normalised(sched.weights(0))
    shares = normalised({t: w[t] * a for t, a in zip(tasks, strength)})
    for t in tasks:
        assert shares[t] == pytest.approx(target[t], abs=1e-3)
    ref = normalised({t: target[t] / a for t, a in zip(tasks, strength)})
    assert w == pytest.approx(ref, abs=1e-3)


def test_gradient_share_one_update_matches_formula():
    sched = bound(GradientShare(rate=0.5, smoothing=0.0, floor=0.1, max_step=2.0), [1, 1])
    sched.update({"update_share/a": 0.8, "update_share/b": 0.2, "grad_norm/a": 3.0})
    # w = 0.5·clip((0.5/0.8)^0.5) and 0.5·clip((0.5/0.2)^0.5 = 1.58), normalised, then floor
    raw = {"a": 0.5 * (0.5 / 0.8) ** 0.5, "b": 0.5 * (0.5 / 0.2) ** 0.5}
    p = normalised(raw)
    assert sched.weights(0) == pytest.approx({t: 0.1 + 0.8 * p[t] for t in "ab"})
    before = sched.weights(0)
    sched.update({"update_share/a": float("nan"), "loss": 1.0})  # nothing usable: unchanged
    assert sched.weights(0) == before and sched.num_updates == 1
    sched.update({"update_share/b": -0.5})  # negative share counts as eps; ratio clipped at max_step
    assert sched.weights(0)["b"] > before["b"]


def reference_lp(history, fast, slow, floor, tasks):
    f, s = {}, {}
    for metrics in history:
        for t in tasks:
            r = metrics.get(f"reward/{t}/mean")
            if r is None:
                continue
            if t not in f:
                f[t] = s[t] = r
            else:
                f[t] = fast * f[t] + (1 - fast) * r
                s[t] = slow * s[t] + (1 - slow) * r
    lp = {t: abs(f[t] - s[t]) for t in f}
    full = {t: lp.get(t, max(lp.values())) for t in tasks}
    total = sum(full.values())
    p = {t: (full[t] / total if total > 0 else 1 / len(tasks)) for t in tasks}
    return {t: floor + (1 - len(tasks) * floor) * p[t] for t in tasks}


@FAST
@given(rewards=st.lists(st.lists(st.one_of(st.none(), st.floats(-2, 2)), min_size=3, max_size=3), min_size=1, max_size=12))
def test_learning_progress_matches_reference(rewards):
    history = [{f"reward/{t}/mean": r for t, r in zip("abc", row) if r is not None} for row in rewards]
    sched = bound(LearningProgress(fast=0.5, slow=0.9, floor=0.05), [4, 4, 4])
    for m in history:
        sched.update(m)
    usable = [m for m in history if m]
    if not usable:
        assert sched.weights(0) == pytest.approx({t: 1 / 3 for t in "abc"})
        return
    w = sched.weights(0)
    assert w == pytest.approx(reference_lp(usable, 0.5, 0.9, 0.05, "abc"), abs=1e-12)
    assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0.05 - 1e-12


def test_learning_progress_prefers_the_task_that_moves():
    sched = bound(LearningProgress(floor=0.05), [4, 4])
    for step in range(20):
        sched.update({"reward/a/mean": 0.05 * step, "reward/b/mean": 0.3})
    w = sched.weights(0)
    assert w["a"] > 0.9 and w["b"] == pytest.approx(0.05)


@FAST
@given(rewards=st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=1, max_size=10),
       temperature=st.floats(0.05, 5))
def test_worst_task_matches_reference(rewards, temperature):
    sched = bound(WorstTask(temperature=temperature, smoothing=0.8, floor=0.02), [4, 4, 4])
    ema = {}
    for row in rewards:
        sched.update({f"reward/{t}/mean": r for t, r in zip("abc", row)})
        for t, r in zip("abc", row):
            ema[t] = r if t not in ema else 0.8 * ema[t] + 0.2 * r
    z = {t: math.exp(-(ema[t] - min(ema.values())) / temperature) for t in "abc"}
    ref = {t: 0.02 + (1 - 3 * 0.02) * z[t] / sum(z.values()) for t in "abc"}
    w = sched.weights(0)
    assert w == pytest.approx(ref, abs=1e-12)
    worst = min(ema, key=ema.get)
    assert w[worst] == pytest.approx(max(w.values()))


def test_worst_task_explores_unseen_tasks():
    sched = bound(WorstTask(temperature=0.1), [1, 1, 1])
    sched.update({"reward/a/mean": 0.9, "reward/b/mean": 0.1})
    w = sched.weights(0)
    assert w["c"] == pytest.approx(w["b"]) and w["a"] < w["b"]


@pytest.mark.parametrize(
    "make",
    [lambda: GradientShare(floor=0.05), lambda: LearningProgress(), lambda: WorstTask()],
    ids=["GradientShare", "LearningProgress", "WorstTask"],
)
def test_adaptive_rank_consistency_and_checkpoint(make):
    stream = [
        {"update_share/a": 0.6 - 0.02 * i, "update_share/b": 0.3, "update_share/c": 0.1 + 0.02 * i,
         "reward/a/mean": 0.1 * i, "reward/b/mean": 0.5, "reward/c/mean": 0.2 + 0.01 * i * i}
        for i in range(12)
    ]
    rank0, rank1 = bound(make(), [3, 3, 3]), bound(make(), [3, 3, 3])
    for m in stream[:6]:
        rank0.update(m)
        rank1.update(m)
    assert rank0.weights(6) == rank1.weights(6) and rank0.state_dict() == rank1.state_dict()
    assert rank0.weights(6) != {t: 1 / 3 for t in "abc"}, "the metrics moved the weights"
    resumed = bound(make(), [3, 3, 3])
    resumed.load_state_dict(rank0.state_dict())
    for m in stream[6:]:
        rank0.update(m)
        resumed.update(m)
    assert resumed.weights(12) == rank0.weights(12) and resumed.num_updates == rank0.num_updates == 12
    with pytest.raises(TaskError, match="cannot be loaded"):
        bound(Fixed({"a": 1}), [3, 3, 3]).load_state_dict(rank0.state_dict())


def test_option_errors():
    with pytest.raises(WeightsError, match="floor=0.5 times 3 tasks exceeds 1"):
        bound(LearningProgress(floor=0.5), [1, 1, 1])
    with pytest.raises(WeightsError, match="tau"):
        Temperature(0)
    with pytest.raises(WeightsError, match="fast=0.9 must be smaller than slow=0.5"):
        LearningProgress(fast=0.9, slow=0.5)
    with pytest.raises(UnknownTaskError, match="GradientShare target name unknown task 'x'"):
        bound(GradientShare(target={"x": 1.0}), [1, 1])
    with pytest.raises(WeightsError, match="temperature"):
        WorstTask(temperature=-1)
    with pytest.raises(WeightsError, match="weights must be a mapping"):
        as_schedule(3.0)
    with pytest.raises(TaskError, match="not bound"):
        GradientShare().weights(0)
    sched = bound(Fixed({"a": 1}), [1, 1])
    with pytest.raises(TaskError, match="bound to tasks"):
        sched.bind(("x", "y"), {"x": 1, "y": 1})


def test_duck_typed_schedule_is_accepted():
    class Mine:
        def __init__(self):
            self.bound_to = None
            self.calls = 0

        def bind(self, tasks, sizes):
            self.bound_to = (tasks, sizes)

        def weights(self, step):
            return {"a": 1.0, "b": float(step % 2)}

        def update(self, metrics):
            self.calls += 1

    inner = Mine()
    rows = [{"task": t} for t in "abab"]
    s = MixtureSampler(rows, weights=inner, prompts_per_batch=2, num_batches=4)
    assert inner.bound_to == (("a", "b"), {"a": 2, "b": 2})
    list(s)
    assert s.weights_history == [(0, {"a": 1.0, "b": 0.0}), (1, {"a": 0.5, "b": 0.5}), (2, {"a": 1.0, "b": 0.0}),
                                 (3, {"a": 0.5, "b": 0.5})]
    s.schedule.update({})
    assert inner.calls == 1


def test_sampler_applies_updates_to_batches_drawn_after_them():
    """An update between batches j-1 and j changes the weights from batch j on (the declared rule)."""
    rows = [{"task": t} for t in "ab" * 20]
    sched = WorstTask(temperature=0.05, floor=0.05)
    s = MixtureSampler(rows, weights=sched, prompts_per_batch=4, num_batches=6)
    it = iter(s)
    first = [next(it) for _ in range(4 * 2)]  # batches 0 and 1 drawn
    assert len(first) == 8 and s.batches_drawn == 2
    sched.update({"reward/a/mean": 1.0, "reward/b/mean": 0.0})
    rest = list(it)
    hist = s.weights_history
    assert [b for b, _ in hist] == [0, 2]
    assert hist[1][1]["b"] > 0.9
    assert [rows[i]["task"] for i in rest[:4]].count("b") == 4
