"""MixtureSampler yields its index stream lazily (issue 14, item 20).

A batch is ``B`` prompts, each ``G`` times, the block repeated ``R`` times: ``B·G·R`` indices.
TRL's ``RepeatSampler`` yields them one by one; ``MixtureSampler`` used to build the whole list
per batch (``repeat_count=10**6`` → ~1 GB). The order must be exactly the old eager one.
"""

from __future__ import annotations

import itertools
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancedmix.sampler import MixtureSampler

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_rows(sizes):
    return [{"task": "abc"[t]} for t, n in enumerate(sizes) for _ in range(n)]


def eager_stream(rows, b, g, r, seed, num_batches, epochs=1, **kw):
    """The old eager construction: per batch, ``[i for i in prompts for _ in range(g)] * r``.

    The prompts of a batch do not depend on ``G`` or ``R`` (without ``homogeneous``), so they are
    read from a sampler with ``G = R = 1``.
    """
    base = MixtureSampler(rows, prompts_per_batch=b, num_generations=1, repeat_count=1, seed=seed, num_batches=num_batches, **kw)
    out = []
    for _ in range(epochs):
        prompts = list(base)
        for j in range(num_batches):
            block = [i for i in prompts[j * b : (j + 1) * b] for _ in range(g)]
            out.extend(block * r)
    return out


@FAST
@given(
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    b=st.integers(1, 5),
    g=st.integers(1, 4),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    num_batches=st.integers(1, 4),
)
def test_lazy_stream_equals_eager_order(sizes, b, g, r, seed, num_batches):
    rows = make_rows(sizes)
    lazy = MixtureSampler(rows, prompts_per_batch=b, num_generations=g, repeat_count=r, seed=seed, num_batches=num_batches)
    got = list(lazy) + list(lazy)  # two epochs
    assert got == eager_stream(rows, b, g, r, seed, num_batches, epochs=2)
    assert len(got) == 2 * len(lazy)


@FAST
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    b=st.integers(1, 4),
    g=st.integers(1, 3),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    cut=st.integers(0, 200),
)
def test_resume_mid_batch_continues_the_lazy_stream(sizes, b, g, r, seed, cut):
    """load_state_dict at any read position (inside a repeat, inside a group) continues exactly."""
    rows = make_rows(sizes)
    kw = dict(prompts_per_batch=b, num_generations=g, repeat_count=r, seed=seed, num_batches=3)
    full = list(MixtureSampler(rows, **kw))
    cut = cut % (len(full) + 1)
    first = MixtureSampler(rows, **kw)
    it = iter(first)
    head = list(itertools.islice(it, cut))
    state = first.state_dict()
    second = MixtureSampler(rows, **kw)
    second.load_state_dict(state)
    assert head + list(second) == full


def test_huge_repeat_count_is_not_materialised():
    """The first indices of a batch with R = 10**5 (1.6M indices) cost no memory proportional to R."""
    rows = make_rows([5, 3])
    sampler = MixtureSampler(rows, prompts_per_batch=4, num_generations=4, repeat_count=10**5, seed=3)
    tracemalloc.start()
    try:
        first = list(itertools.islice(iter(sampler), 40))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes: the batch was materialised"
    small = MixtureSampler(rows, prompts_per_batch=4, num_generations=4, repeat_count=3, seed=3)
    assert first == list(itertools.islice(iter(small), 40))
    assert first[16:32] == first[:16]  # the block repeats
    assert len(sampler) == 2 * 4 * 4 * 10**5


def test_huge_repeat_count_resumes_without_materialising():
    """A saved read position deep inside a huge batch is reached without building the batch."""
    rows = make_rows([5, 3])
    kw = dict(prompts_per_batch=4, num_generations=4, repeat_count=10**6, seed=3)
    a = MixtureSampler(rows, **kw)
    head = list(itertools.islice(iter(a), 20))
    state = a.state_dict()
    state["offset"] = 16 * 999_999 + 5  # inside the last repeat of batch 0
    b = MixtureSampler(rows, **kw)
    b.load_state_dict(state)
    tracemalloc.start()
    try:
        nxt = list(itertools.islice(iter(b), 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    block = head[:16]
    assert nxt[:11] == block[5:]  # rest of batch 0's last repeat
    c = MixtureSampler(rows, prompts_per_batch=4, num_generations=4, repeat_count=1, seed=3)
    assert nxt[11:] == list(itertools.islice(iter(c), 16, 21))  # batch 1's first indices
