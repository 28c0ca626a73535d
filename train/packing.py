"""Token-balanced packing of sequences onto ranks and micro-batches, and right padding.

Pure functions of lengths and token ids: the same plan comes out on every rank, so each rank can compute
it locally and take its own row (no communication, no accelerate here).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor


def pack_microbatches(
    lengths: Sequence[int], num_ranks: int, max_tokens: int, *, padded: bool = False
) -> list[list[list[int]]]:
    """Assign sequence indices to ranks, then to micro-batches: plan[rank][micro_batch] = [indices].

    1. Ranks: longest first onto the least-loaded rank (LPT; ties to the lower index, then the lower rank),
       so rank token totals differ by at most the longest length.
    2. Micro-batches: on each rank, first-fit decreasing into micro-batches of at most `max_tokens` tokens;
       a sequence longer than `max_tokens` goes alone in its own micro-batch.
    3. Every rank gets the same number of micro-batches, so gradient collectives stay in step: a rank with
       fewer is filled up at the end with empty micro-batches `[]`, on which the caller takes a zero-loss step.

    Deterministic: the plan depends only on the arguments. Indices inside a micro-batch are ascending;
    micro-batches on a rank come largest-first (an out-of-memory error shows up on the first one).
    `padded=True` bounds the padded size instead, count x longest member (what a right-padded batch
    actually allocates), rather than the sum of lengths. An empty `lengths` gives no micro-batches on any rank.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks: expected an integer >= 1, got {num_ranks}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected an integer >= 1, got {max_tokens}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths: expected integers >= 0, got {min(lengths)}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    loads = [(0, r) for r in range(num_ranks)]  # min-heap of (tokens, rank)
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in order:
        load, r = heapq.heappop(loads)
        per_rank[r].append(i)  # each rank's list stays longest-first
        heapq.heappush(loads, (load + lengths[i], r))

    plan = [_first_fit_decreasing(idx, lengths, max_tokens, padded) for idx in per_rank]
    count = max((len(p) for p in plan), default=0)
    return [p + [[] for _ in range(count - len(p))] for p in plan]


def _first_fit_decreasing(indices: list[int], lengths: Sequence[int], max_tokens: int, padded: bool) -> list[list[int]]:
    """`indices` sorted longest-first -> micro-batches; the first member of each is its longest."""
    bins: list[list[int]] = []
    sums: list[int] = []
    for i in indices:
        n = lengths[i]
        for b, members in enumerate(bins):
            size = (len(members) + 1) * lengths[members[0]] if padded else sums[b] + n
            if size <= max_tokens:
                members.append(i)
                sums[b] += n
                break
        else:
            bins.append([i])
            sums.append(n)
    return [sorted(members) for members in bins]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists to the longest: ids (B, T) long, attention mask (B, T) long, 1 on real tokens."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[row, : len(s)] = 1
    return ids, attention
