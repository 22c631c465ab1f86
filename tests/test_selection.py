"""Exact k-th smallest selection: the radix path (used on accelerators and across ranks) and
the host path (CPU) against a sort."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo_ops._utils.selection import (float32_to_ordered_key, kth_smallest,
                                 ordered_key_to_float32)

finite_floats = st.floats(allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_floats | st.sampled_from([0.0, -0.0, float("inf"), float("-inf")]),
                       min_size=1, max_size=300),
       data=st.data())
def test_radix_and_host_paths_select_the_kth_smallest(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values),
                                            max_size=len(values))))
    if not valid.any():
        valid[0] = True
    count = int(valid.sum())
    k = data.draw(st.integers(1, count))
    expected = x[valid].sort().values[k - 1]
    radix = kth_smallest(x, valid, torch.tensor(k), reduce_counts=lambda counts: counts)
    host = kth_smallest(x, valid, torch.tensor(k))
    assert radix.item() == expected.item() and host.item() == expected.item()


def test_ordered_keys_round_trip_and_preserve_order():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    keys = float32_to_ordered_key(x)
    assert (keys[1:] > keys[:-1]).all()
    assert torch.equal(ordered_key_to_float32(keys).view(torch.int32), x.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_floats | st.sampled_from([0.0, 1.0, -1.0]), min_size=0,
                       max_size=40),
       data=st.data())
def test_radix_and_host_paths_agree_for_every_k(values, data):
    """Any k, also k > count (the largest valid value) and no valid value at all (0), and
    ties: the radix path (accelerators, torch.compile, process groups) and the host path
    give the same value."""
    x = torch.tensor(values, dtype=torch.float32)
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values),
                                            max_size=len(values))), dtype=torch.bool)
    count = int(valid.sum())
    k = data.draw(st.integers(1, count + 5))
    expected = x[valid].sort().values[min(k, count) - 1].item() if count else 0.0
    radix = kth_smallest(x, valid, torch.tensor(k), reduce_counts=lambda counts: counts)
    host = kth_smallest(x, valid, torch.tensor(k))
    assert radix.item() == expected and host.item() == expected
