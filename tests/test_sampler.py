"""MixtureSampler: RepeatSampler structure, exact quotas, per-task epochs, ranks, resume, errors."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancedmix.sampler import MixtureSampler, homogeneous_order
from balancedmix.schedules import Fixed, GradientShare, MixtureSchedule, WeightsError
from balancedmix.tasks import MissingTaskLabelError, TaskError, UnknownTaskError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ("a", "b", "c", "d")


def make_rows(sizes, interleave=True):
    """Rows of tasks a, b, ... with the given sizes; interleaved so task rows are not contiguous."""
    rows = [{"task": NAMES[t], "id": (t, i)} for t, n in enumerate(sizes) for i in range(n)]
    if interleave:
        rows = [rows[i] for i in np.random.default_rng(len(rows)).permutation(len(rows))]
    return rows


def split_batches(stream, b, g, r):
    """Check the RepeatSampler structure; return the B prompts of every batch."""
    per = b * g * r
    assert len(stream) % per == 0
    batches = []
    for j in range(len(stream) // per):
        chunk = stream[j * per : (j + 1) * per]
        block = chunk[: b * g]
        assert chunk == block * r, "each batch must be repeated R times in a row"
        prompts = block[::g]
        assert block == [p for p in prompts for _ in range(g)], "each prompt must be repeated G times consecutively"
        batches.append(prompts)
    return batches


class Scripted(MixtureSchedule):
    """Weights from a list indexed by batch (the last one repeats); a test double."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def weights(self, step):
        return dict(self.script[min(step, len(self.script) - 1)])


# ------------------------------------------------------------------ structure and quotas
@FAST
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    data=st.data(),
    b=st.integers(1, 8),
    g=st.integers(1, 3),
    r=st.integers(1, 3),
    m=st.integers(0, 2),
    nb=st.integers(1, 12),
    seed=st.integers(0, 2**40),
)
def test_structure_and_exact_quotas(sizes, data, b, g, r, m, nb, seed):
    k = len(sizes)
    if b < m * k:
        m = 0
    w = data.draw(st.lists(st.integers(0, 5), min_size=k, max_size=k).filter(any))
    rows = make_rows(sizes)
    weights = {NAMES[t]: w[t] for t in range(k)}
    s = MixtureSampler(rows, weights=weights, prompts_per_batch=b, num_generations=g, repeat_count=r, seed=seed,
                       tasks=NAMES[:k], min_per_task=m, num_batches=nb)
    stream = list(s)
    assert len(stream) == len(s) == nb * b * g * r
    batches = split_batches(stream, b, g, r)
    p = [Fraction(x, sum(w)) for x in w]
    free = b - m * sum(1 for x in w if x > 0)
    total = [0] * k
    for j, prompts in enumerate(batches, start=1):
        counts = Counter(rows[i]["task"] for i in prompts)
        for t in range(k):
            c = counts.get(NAMES[t], 0)
            if w[t] == 0:
                assert c == 0, "a zero-weight task is never drawn"
            else:
                assert c >= m
            # distinct within the batch whenever the task has enough prompts
            if c <= sizes[t]:
                assert len({i for i in prompts if rows[i]["task"] == NAMES[t]}) == c
            total[t] += c - (m if w[t] > 0 else 0)
        h = j * free
        for t in range(k):  # quota property: floor(h p) <= N <= ceil(h p) at every batch boundary
            assert math.floor(h * p[t]) <= total[t] <= math.ceil(h * p[t])


def quota_violation(weights, b, nb, seed=0):
    """First batch after which some task's cumulative count leaves [floor(h·p), ceil(h·p)], or None."""
    names = [f"t{i}" for i in range(len(weights))]
    rows = [{"task": t} for t in names for _ in range(7)]
    s = MixtureSampler(rows, weights=dict(zip(names, weights)), prompts_per_batch=b, seed=seed, num_batches=nb)
    got = Counter()
    for j, prompts in enumerate(split_batches(list(s), b, 1, 1), start=1):
        got.update(rows[i]["task"] for i in prompts)
        for t, w in zip(names, weights):
            ideal = Fraction(j * b * w, sum(weights))
            if not math.floor(ideal) <= got[t] <= math.ceil(ideal):
                return j
    return None


@pytest.mark.parametrize(
    "weights,b,nb",
    [
        ((1, 1, 4), 1, 12),  # Jefferson/D'Hondt without the upper-quota eligibility breaks quota here
        ((1, 22, 22, 1, 1), 3, 40),  # plain "largest deficit first" breaks quota here (at batch 10)
        ((3, 5, 7, 11, 13, 17), 4, 60),
    ],
)
def test_quota_on_known_hard_cases(weights, b, nb):
    assert quota_violation(weights, b, nb) is None


@FAST
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3), b=st.integers(1, 7), nb=st.integers(1, 15),
       seed=st.integers(0, 1000), multinomial=st.booleans())
def test_no_repeat_within_task_epoch(sizes, b, nb, seed, multinomial):
    rows = make_rows(sizes)
    k = len(sizes)
    s = MixtureSampler(rows, weights={NAMES[t]: 1.0 for t in range(k)}, prompts_per_batch=b, seed=seed,
                       num_batches=nb, rounding="multinomial" if multinomial else "largest_remainder")
    own = {t: sorted(i for i, row in enumerate(rows) if row["task"] == t) for t in NAMES[:k]}
    seen = {t: Counter() for t in NAMES[:k]}
    for prompts in split_batches(list(s), b, 1, 1):
        for i in prompts:
            seen[rows[i]["task"]][i] += 1
        # at every batch boundary, a task that has given `total` prompts has given each of its n
        # prompts total // n or total // n + 1 times: every completed task epoch is a permutation
        for t, counter in seen.items():
            n, total = len(own[t]), sum(counter.values())
            q, extra = divmod(total, n)
            per_item = [counter.get(i, 0) for i in own[t]]
            assert sorted(per_item) == [q] * (n - extra) + [q + 1] * extra
            assert s.task_epochs[t] >= q  # task_epochs is as of the last batch drawn (ahead)
    for t, counter in seen.items():
        assert s.task_epochs[t] == sum(counter.values()) // len(own[t])


def test_frequencies_converge_multinomial():
    rows = make_rows([50, 30, 20])
    s = MixtureSampler(rows, weights={"a": 0.2, "b": 0.3, "c": 0.5}, prompts_per_batch=10, seed=3,
                       rounding="multinomial", num_batches=600)
    counts = Counter(rows[i]["task"] for i in s)
    n = 6000
    for t, p in {"a": 0.2, "b": 0.3, "c": 0.5}.items():
        assert abs(counts[t] - n * p) < 4 * math.sqrt(n * p * (1 - p))
    # per-batch counts vary (it is a draw, not a rounding)
    s.set_epoch(0)
    sizes = {tuple(sorted(Counter(rows[i]["task"] for i in batch).items())) for batch in split_batches(list(s), 10, 1, 1)}
    assert len(sizes) > 3


def test_small_weight_is_not_starved_by_rounding():
    # 1 prompt per batch and weight 0.05: the quota gives task b exactly one prompt in every 20 batches
    rows = make_rows([40, 40])
    s = MixtureSampler(rows, weights={"a": 0.95, "b": 0.05}, prompts_per_batch=1, seed=0, num_batches=200)
    labels = [rows[i]["task"] for i in s]
    for w in range(10):
        assert labels[w * 20 : (w + 1) * 20].count("b") == 1


@settings(max_examples=25, deadline=None)
@given(script=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=30),
       b=st.integers(1, 6))
def test_deficit_carries_over_weight_changes(script, b):
    """With weights changing every batch, each task's count stays within 2 of Σ_batches B·p_t(b)."""
    rows = make_rows([7, 7, 7])
    weights = [{"a": x, "b": y, "c": z} for x, y, z in script]
    s = MixtureSampler(rows, weights=Scripted(weights), prompts_per_batch=b, seed=1, num_batches=len(weights))
    ideal = Counter()
    got = Counter()
    for j, prompts in enumerate(split_batches(list(s), b, 1, 1)):
        w = weights[j]
        for t in "abc":
            ideal[t] += Fraction(b * w[t], sum(w.values()))
        got.update(rows[i]["task"] for i in prompts)
        for t in "abc":
            assert abs(got[t] - ideal[t]) < 2


# ------------------------------------------------------------------ drop-in for RepeatSampler
@FAST
@given(sizes=st.lists(st.integers(1, 10), min_size=1, max_size=4), b=st.integers(1, 6), g=st.integers(1, 3),
       r=st.integers(1, 2), seed=st.integers(0, 10_000))
def test_drop_in_multiset_matches_repeat_sampler(sizes, b, g, r, seed):
    """"Same multiset per epoch", precisely (nb = N // B):

    * N % B == 0: in every epoch both samplers yield every index exactly G·R times (equal multisets).
    * otherwise, first epoch: both yield nb·B distinct prompts, each exactly G·R times. RepeatSampler
      drops N mod B prompts at random (task counts hypergeometric); MixtureSampler drops by quota,
      task t contributes floor or ceil of nb·B·n_t/N. Later epochs differ by design: RepeatSampler
      reshuffles and drops again, MixtureSampler continues each task's permutation (no prompt is
      dropped, see test_no_repeat_within_task_epoch).
    """
    from trl.trainer.utils import RepeatSampler

    rows = make_rows(sizes)
    n = len(rows)
    nb = n // b
    if nb == 0:
        return
    ours = MixtureSampler(rows, prompts_per_batch=b, num_generations=g, repeat_count=r, seed=seed)
    theirs = RepeatSampler(rows, mini_repeat_count=g, batch_size=b, repeat_count=r, seed=seed)
    assert len(ours) == len(theirs)
    mine, ref = Counter(ours), Counter(theirs)
    assert set(mine.values()) == set(ref.values()) == {g * r}
    assert len(mine) == len(ref) == nb * b
    per_task = Counter(rows[i]["task"] for i in mine)
    for t, size in Counter(row["task"] for row in rows).items():
        quota = Fraction(nb * b * size, n)
        assert math.floor(quota) <= per_task.get(t, 0) <= math.ceil(quota)
    if n % b == 0:  # nothing dropped: the same multiset in every epoch
        for _epoch in range(3):
            assert mine == ref == Counter({i: g * r for i in range(n)})
            mine, ref = Counter(ours), Counter(theirs)


# ------------------------------------------------------------------ homogeneous micro-batches
@FAST
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), b=st.integers(1, 12), g=st.integers(1, 4),
       mb_mult=st.integers(1, 4), seed=st.integers(0, 100))
def test_homogeneous_order_is_optimal_when_micro_batch_is_whole_groups(sizes, b, g, mb_mult, seed):
    rows = make_rows(sizes)
    k = len(sizes)
    kw = dict(weights={NAMES[t]: 1 for t in range(k)}, prompts_per_batch=b, num_generations=g, seed=seed, num_batches=4)
    mixed = MixtureSampler(rows, **kw)
    homo = MixtureSampler(rows, homogeneous=True, micro_batch_size=g * mb_mult, **kw)
    mb = g * mb_mult
    for a, h in zip(split_batches(list(mixed), b, g, 1), split_batches(list(homo), b, g, 1)):
        assert sorted(a) == sorted(h), "homogeneous only reorders the same prompts"
        flat = [i for i in h for _ in range(g)]
        counts = Counter(rows[i]["task"] for i in h)
        best = sum(c * g // mb for c in counts.values())
        single = sum(1 for s in range(0, len(flat), mb) if len({rows[i]["task"] for i in flat[s : s + mb]}) == 1
                     and len(flat[s : s + mb]) == mb)
        assert single == best


def test_homogeneous_order_runs_cover_counts():
    rng = np.random.default_rng(0)
    runs = homogeneous_order([5, 3, 0, 7], group=4, micro_batch=6, rng=rng)  # lcm 12 -> units of 3 prompts
    got = Counter()
    for t, c in runs:
        got[t] += c
    assert got == Counter({0: 5, 1: 3, 3: 7})
    assert [c for _, c in runs[:4]] == [3, 3, 3, 3]


# ------------------------------------------------------------------ ranks
def test_two_ranks_identical_and_sharded_like_accelerate():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    rows = make_rows([30, 20, 10])
    b, g, r, bs = 6, 2, 2, 3  # global gen batch 12 = 2 processes x 2 steps x 3 per device

    def rank(p):
        sched = GradientShare(rate=1.0, floor=0.05)
        s = MixtureSampler(rows, weights=sched, prompts_per_batch=b, num_generations=g, repeat_count=r, seed=7,
                           num_batches=6)
        shard = BatchSamplerShard(BatchSampler(s, bs * 2, drop_last=False), num_processes=2, process_index=p)
        out = []
        for local, batch in enumerate(shard):
            out.append(batch)
            if local % r == r - 1:  # one "optimizer step" per generation batch: same metrics on both ranks
                sched.update({"update_share/a": 0.7, "update_share/b": 0.2, "update_share/c": 0.1 + 0.01 * local})
        return s, out

    s0, out0 = rank(0)
    s1, out1 = rank(1)
    assert s0.weights_history == s1.weights_history
    assert len(s0.weights_history) > 2, "the adaptive weights changed during the run"
    # interleaving the two shards gives back the full single-process stream with the same weights
    full = [i for a, c in zip(out0, out1) for i in a + c]
    ref = MixtureSampler(rows, weights=Fixed({"a": 1}), prompts_per_batch=b, num_generations=g, repeat_count=r,
                         seed=7, num_batches=6)
    ref.load_state_dict({**s0.state_dict(), "schedule": ref.schedule.state_dict()})
    ref.set_epoch(0)
    assert list(ref) == full
    split_batches(full, b, g, r)


# ------------------------------------------------------------------ resume
@FAST
@given(cut=st.integers(0, 6 * 4 * 2 * 3 - 1), extra_epochs=st.integers(0, 1))
def test_resume_mid_stream_identical(cut, extra_epochs):
    rows = make_rows([13, 9, 5])
    kw = dict(prompts_per_batch=4, num_generations=2, repeat_count=3, seed=11, num_batches=6)

    def feed(sched, position):  # deterministic metrics, fed at fixed stream positions
        if position % 24 == 5:
            sched.update({f"update_share/{t}": 0.1 + ((position // 24 + i) % 3) * 0.3 for i, t in enumerate("abc")})

    sched = GradientShare(floor=0.05)
    full = MixtureSampler(rows, weights=sched, **kw)
    want = []
    for _ in range(1 + extra_epochs + 1):
        for i in full:
            feed(sched, len(want))
            want.append(i)

    sched_a = GradientShare(floor=0.05)
    first = MixtureSampler(rows, weights=sched_a, **kw)
    got = []
    total_cut = cut + extra_epochs * len(first)
    it = iter(first)
    while len(got) < total_cut:
        try:
            i = next(it)
        except StopIteration:
            it = iter(first)
            continue
        feed(sched_a, len(got))
        got.append(i)
    state = first.state_dict()

    sched_b = GradientShare(floor=0.05)
    second = MixtureSampler(rows, weights=sched_b, **kw)
    second.load_state_dict(state)
    while len(got) < len(want):
        for i in second:
            feed(sched_b, len(got))
            got.append(i)
    assert got == want


def test_resume_by_replaying_the_epoch_like_the_hf_trainer():
    """load_state_dict + set_epoch(e) + skip the trained batches == uninterrupted (recorded weights reused)."""
    rows = make_rows([11, 7])
    kw = dict(prompts_per_batch=3, num_generations=2, repeat_count=2, seed=5, num_batches=5)
    script = [{"a": 1, "b": j % 4 + 1} for j in range(40)]
    full = MixtureSampler(rows, weights=Scripted(script), **kw)
    want = list(full) + list(full)

    first = MixtureSampler(rows, weights=Scripted(script), **kw)
    list(first)
    it = iter(first)
    read_ahead = [next(it) for _ in range(25)]  # the DataLoader read ahead of the trained position
    state = first.state_dict()
    del read_ahead

    second = MixtureSampler(rows, weights=Scripted([{"a": 1, "b": 9}]), **kw)  # a different schedule now
    second.load_state_dict({**state, "schedule": second.schedule.state_dict()})
    second.set_epoch(1)
    # batches drawn before the save keep their recorded weights; only later ones see the new schedule
    assert list(second)[:25] == want[len(full) : len(full) + 25]


def test_set_epoch_selects_a_slice_of_the_stream():
    rows = make_rows([9, 4])
    kw = dict(weights={"a": 2, "b": 1}, prompts_per_batch=3, seed=2, num_batches=3)
    s = MixtureSampler(rows, **kw)
    epochs = [list(s) for _ in range(4)]
    t = MixtureSampler(rows, **kw)
    t.set_epoch(2)
    assert list(t) == epochs[2]
    t.set_epoch(0)
    assert list(t) == epochs[0]
    assert list(t) == epochs[1]  # without set_epoch, iteration moves on
    assert epochs[0] != epochs[1]


def test_state_dict_rejects_other_configuration():
    rows = make_rows([5, 5])
    s = MixtureSampler(rows, prompts_per_batch=2, seed=1)
    with pytest.raises(TaskError, match="prompts_per_batch"):
        MixtureSampler(rows, prompts_per_batch=3, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(TaskError, match="seed"):
        MixtureSampler(rows, prompts_per_batch=2, seed=2).load_state_dict(s.state_dict())


# ------------------------------------------------------------------ labels
class CountingColumns:
    """A column store like datasets.Dataset that counts row reads."""

    def __init__(self, tasks):
        self._tasks = list(tasks)
        self.column_names = ["task", "prompt"]
        self.row_reads = 0
        self.column_reads = 0

    def __len__(self):
        return len(self._tasks)

    def __getitem__(self, key):
        if isinstance(key, str):
            self.column_reads += 1
            return list(self._tasks)
        self.row_reads += 1
        return {"task": self._tasks[key], "prompt": "x"}


def test_labels_read_once_by_column():
    ds = CountingColumns(["a", "b", "a", "c"] * 5)
    s = MixtureSampler(ds, prompts_per_batch=4, seed=0)
    assert (ds.column_reads, ds.row_reads) == (1, 0)
    list(s)
    assert (ds.column_reads, ds.row_reads) == (1, 0)
    assert s.task_sizes == {"a": 10, "b": 5, "c": 5}


def test_hf_dataset_and_torch_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(12)], "task": ["x", "y", "y"] * 4})
    s = MixtureSampler(ds.select(range(2, 12)), prompts_per_batch=5, seed=0)
    assert s.tasks == ("y", "x") and s.task_sizes == {"y": 7, "x": 3}

    tds = torch.utils.data.TensorDataset(torch.arange(6), torch.tensor([0, 1, 0, 1, 1, 1]))
    s = MixtureSampler(tds, task_key=lambda row: int(row[1]), tasks=["even", "odd"], prompts_per_batch=3)
    assert s.task_sizes == {"even": 2, "odd": 4}
    with pytest.raises(MissingTaskLabelError, match="row 0 .*tuple.*callable task_key"):
        MixtureSampler(tds, prompts_per_batch=3)


# ------------------------------------------------------------------ errors
def test_bad_input_errors():
    rows = make_rows([4, 4])
    with pytest.raises(MissingTaskLabelError, match="row .* no task key 'kind'"):
        MixtureSampler(rows, task_key="kind", prompts_per_batch=2)
    with pytest.raises(MissingTaskLabelError, match="no task column 'kind'"):
        MixtureSampler(CountingColumns("ab"), task_key="kind")
    with pytest.raises(UnknownTaskError, match="task 'b'.*declared tasks \\['a'\\]"):
        MixtureSampler(rows, tasks=["a"], prompts_per_batch=2)
    with pytest.raises(UnknownTaskError, match="unknown task 'z'"):
        MixtureSampler(rows, weights={"a": 1, "z": 1}, prompts_per_batch=2)
    with pytest.raises(WeightsError, match="task 'b' is negative"):
        MixtureSampler(rows, weights={"a": 1, "b": -1}, prompts_per_batch=2)
    with pytest.raises(WeightsError, match="all weights are zero"):
        MixtureSampler(rows, weights={"a": 0, "b": 0}, prompts_per_batch=2)
    with pytest.raises(WeightsError, match="not finite"):
        MixtureSampler(rows, weights={"a": float("nan"), "b": 1}, prompts_per_batch=2)
    with pytest.raises(TaskError, match="task 'c' has no rows"):
        MixtureSampler(rows, tasks=["a", "b", "c"], prompts_per_batch=3)
    with pytest.raises(ValueError, match="prompts_per_batch=2 is smaller than min_per_task=1 x 3 tasks"):
        MixtureSampler(make_rows([2, 2, 2]), prompts_per_batch=2, min_per_task=1)
    with pytest.raises(TaskError, match="empty"):
        MixtureSampler([], prompts_per_batch=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        MixtureSampler(rows, prompts_per_batch=2, homogeneous=True)
    with pytest.raises(ValueError, match="rounding"):
        MixtureSampler(rows, prompts_per_batch=2, rounding="round")
    bad_later = Scripted([{"a": 1, "b": 1}] * 3 + [{"a": 1, "b": -2}])
    s = MixtureSampler(rows, weights=bad_later, prompts_per_batch=2, num_batches=5)
    with pytest.raises(WeightsError, match=r"weights\(3\).*task 'b' is negative"):
        list(s)


def test_exposed_views_and_metrics():
    rows = make_rows([6, 2])
    s = MixtureSampler(rows, weights={"a": 3, "b": 1}, prompts_per_batch=4, num_generations=2, seed=0)
    assert s.tasks == tuple(sorted(s.tasks, key=[r["task"] for r in rows].index))
    assert s.current_weights == {"a": 0.75, "b": 0.25}
    assert s.task_epochs == {"a": 0, "b": 0} and s.batches_drawn == 0
    assert len(s) == 2 * 4 * 2  # (N // B) * B * G * R
    list(s)
    assert s.weights_history == [(0, {"a": 0.75, "b": 0.25})]
    assert s.task_epochs == {"a": 1, "b": 1} and s.batches_drawn == 2
    m = s.metrics()
    assert m["mixture/weight/a"] == 0.75 and m["mixture/task_epochs/b"] == 1.0 and m["mixture/batches_drawn"] == 2.0
