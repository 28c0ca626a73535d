"""Packing plans by hand and by property, and right padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginal_rl.train.packing import pack_microbatches, pad_batch


def test_pack_microbatches_by_hand():
    # lengths 5 4 3 3 2 1 (indices 0..5), 2 ranks, max 6 tokens.
    # Ranks, longest first onto the least-loaded:  i0(5)->r0 [5,0]; i1(4)->r1 [5,4]; i2(3)->r1 [5,7];
    #   i3(3)->r0 [8,7]; i4(2)->r1 [8,9]; i5(1)->r0 [9,9].  r0 = i0 i3 i5, r1 = i1 i2 i4.
    # First-fit decreasing, max 6:  r0: 5 | 3 ; 1 joins 5 (6)  -> [0, 5], [3]
    #                               r1: 4 | 3 ; 2 joins 4 (6)  -> [1, 4], [2]
    plan = pack_microbatches([5, 4, 3, 3, 2, 1], num_ranks=2, max_tokens=6)
    assert plan == [[[0, 5], [3]], [[1, 4], [2]]]


def test_pack_microbatches_oversized_alone_and_empty_fill():
    # 10 > max 4 goes alone; the two 1s share a micro-batch.
    assert pack_microbatches([1, 10, 1], num_ranks=1, max_tokens=4) == [[[1], [0, 2]]]
    # One sequence, two ranks: rank 1 gets one empty micro-batch so both take one step.
    assert pack_microbatches([3], num_ranks=2, max_tokens=8) == [[[0]], [[]]]
    # Rank 0: 4 + 4 > 6 -> two micro-batches; rank 1: 3 + 3 -> one, plus one empty to keep in step.
    # LPT: i0(4)->r0, i1(4)->r1, i2(3)->r0 (tie 4/4 -> lower rank) [7,4], i3(3)->r1 [7,7].
    # r0: i0(4) | i2(3) (4+3 > 6); r1: i1(4) | i3(3).  Equal counts, no fill needed.
    assert pack_microbatches([4, 4, 3, 3], num_ranks=2, max_tokens=6) == [[[0], [2]], [[1], [3]]]
    assert pack_microbatches([], num_ranks=3, max_tokens=8) == [[], [], []]


def test_pack_microbatches_padded_bound():
    # lengths 5, 1, 1, max 6, by sum: 5 + 1 = 6 fits, a second 1 would make 7 -> [0, 1], [2].
    assert pack_microbatches([5, 1, 1], num_ranks=1, max_tokens=6) == [[[0, 1], [2]]]
    # Padded: [5, 1] allocates 2 x 5 = 10 > 6, so 5 is alone and the 1s share (2 x 1 = 2).
    assert pack_microbatches([5, 1, 1], num_ranks=1, max_tokens=6, padded=True) == [[[0], [1, 2]]]


def test_pack_microbatches_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_ranks"):
        pack_microbatches([1], num_ranks=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_microbatches([1], num_ranks=1, max_tokens=0)
    with pytest.raises(ValueError, match="lengths"):
        pack_microbatches([1, -2], num_ranks=1, max_tokens=4)


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=300), max_size=60),
    num_ranks=st.integers(min_value=1, max_value=8),
    max_tokens=st.integers(min_value=1, max_value=600),
    padded=st.booleans(),
)
def test_pack_microbatches_properties(lengths, num_ranks, max_tokens, padded):
    plan = pack_microbatches(lengths, num_ranks, max_tokens, padded=padded)
    assert len(plan) == num_ranks
    # every index exactly once
    flat = [i for rank in plan for mb in rank for i in mb]
    assert sorted(flat) == list(range(len(lengths)))
    # the same number of micro-batches on every rank; empty ones only as fill at the end, and only as needed
    counts = {len(rank) for rank in plan}
    assert len(counts) == 1
    for rank in plan:
        real = [mb for mb in rank if mb]
        assert rank[: len(real)] == real
    assert any(all(rank) for rank in plan)
    # the token bound holds unless a micro-batch is a single sequence
    for rank in plan:
        for mb in rank:
            size = len(mb) * max(lengths[i] for i in mb) if padded and mb else sum(lengths[i] for i in mb)
            assert size <= max_tokens or len(mb) == 1
    # rank totals balanced to within the longest sequence
    if lengths:
        loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
        assert max(loads) - min(loads) <= max(lengths)
    # deterministic
    assert pack_microbatches(list(lengths), num_ranks, max_tokens, padded=padded) == plan


def test_pad_batch_right_pads():
    ids, attention = pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == torch.long and attention.dtype == torch.long
    ids, attention = pad_batch([], pad_id=0)
    assert ids.shape == (0, 0) and attention.shape == (0, 0)
