import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix.buffers import FlatBuffers


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(5))), st.integers(1, 4))
def test_rows_stay_in_canonical_order_whatever_the_order_of_first_use(order, n_params):
    params = [torch.zeros(i + 1, 2) for i in range(n_params)]
    buf = FlatBuffers(params, order=lambda k: k)
    for key in order:
        r = buf.row(key)
        for i, p in enumerate(params):
            buf.add(r, i, torch.full_like(p, float(key + 1)))
    assert buf.keys == sorted(order)
    for r, key in enumerate(buf.keys):
        assert torch.all(buf.data[r] == key + 1)
    assert buf.used == set(range(5)) and buf.finish() == list(range(5))


def test_first_write_copies_later_writes_add_and_unwritten_slices_are_zeroed():
    params = [torch.zeros(3), torch.zeros(2)]
    buf = FlatBuffers(params)
    r = buf.row("a")
    buf.add(r, 0, torch.ones(3))
    buf.add(r, 1, torch.ones(2))
    buf.finish()
    buf.reset()
    buf.add(r, 0, torch.full((3,), 2.0))  # new step: overwrites, param 1 not written
    buf.add(r, 0, torch.full((3,), 2.0))
    assert buf.finish() == [r]
    assert buf.data[r].tolist() == [4.0, 4.0, 4.0, 0.0, 0.0]
