"""Compiled kernels for the budget's hot loops (numba, the optional `fast` extra; `dev` includes it).

`greedy()` is budget/pricing.py's allocate_greedy compiled: the same arithmetic on the same float64 values in the same
order (numba compiles without fast-math: nothing is reassociated or fused), the same tie-breaks and the same heap pop
order, so the allocation is the same bit for bit (tests/unit/test_budget_pricing.py checks both against a plain
reference, and against each other on tables with NaNs). It runs the whole allocation, its set-up included: at 128
candidates the Python loop costs ~115 µs a call, half of it numpy's per-call overhead on (128, 17) arrays, the kernel
~20 µs; `posterior_tables()` likewise compiles group_economics' planner tables at the posterior's expectation (~110 µs
of numpy calls, ~10 µs). Both are compiled once per process, when a `marginal` Budget is built (warm; ~2 s), and not cached on disk: in
development numba's cache once served a kernel compiled from an earlier version of this file, which would change results
without a trace. None without numba, or with MARGINAL_RL_KERNELS=0: the callers then run their numpy/Python code (the
plain functions below stay importable either way, uncompiled).
"""

from __future__ import annotations

import functools
import heapq
import math
import os
from collections.abc import Callable

import numpy as np


def _min_nan(values: np.ndarray, offset: float) -> float:
    """np.min of (values − offset), a 1-d array: NaN if any is NaN, inf when empty."""
    out = math.inf
    for v in values:
        v = v - offset
        if math.isnan(v):
            return v
        if v < out:
            out = v
    return out


def _fewest(tokens: np.ndarray, live: np.ndarray, min_n: int) -> float:
    """pricing.fewest_tokens over the rows where `live`."""
    entry, step, nan = math.inf, math.inf, False
    for c in range(tokens.shape[0]):
        if not live[c]:
            continue
        for n in range(min_n, tokens.shape[1]):
            d = tokens[c, n] - tokens[c, 0]
            nan = nan or math.isnan(d)
            entry = min(entry, d)
        for n in range(1, tokens.shape[1]):
            d = tokens[c, n] - tokens[c, n - 1]
            nan = nan or math.isnan(d)
            step = min(step, d)
    return -math.inf if nan else min(entry, step)


def _greedy(gain: np.ndarray, cost: np.ndarray, tokens: np.ndarray, min_n: int, max_n: int, left_samples: float,
            left_tokens: float, by_tokens: bool) -> np.ndarray:
    """allocate_greedy on (P, max_n + 1) float64 tables, P ≥ 1 and 1 ≤ min_n ≤ max_n, its limits already floats."""
    num, blocks = gain.shape[0], max_n + 1 - min_n
    alloc = np.zeros(num, dtype=np.int64)
    block_ppt = np.empty((num, blocks))
    smallest = np.zeros(num)  # each prompt's cheapest entry block over T(0) (0 when tokens are not limited)
    live = np.zeros(num, dtype=np.bool_)
    heap = [(0.0, 0, 0)]  # typed as (−price per token, prompt, size)
    heap.pop()
    for c in range(num):
        for k in range(blocks):
            t = tokens[c, min_n + k]
            block_ppt[c, k] = (gain[c, min_n + k] - cost[c, min_n + k]) / (1e-12 if t < 1e-12 else t)
        entry, best = 0, block_ppt[c, 0]  # np.argmax: the first maximum, or the first NaN
        if not math.isnan(best):
            for k in range(1, blocks):
                v = block_ppt[c, k]
                if math.isnan(v):
                    entry = k
                    break
                if v > best:
                    entry, best = k, v
        if by_tokens:
            smallest[c] = _min_nan(tokens[c, min_n:], tokens[c, 0])
        if block_ppt[c, entry] > 0:
            live[c] = True
            heap.append((-block_ppt[c, entry], c, min_n + entry))
    heapq.heapify(heap)
    least, have_least = -math.inf, not by_tokens  # fewest_tokens, once an option has been dropped
    while len(heap) > 0 and left_samples + 1e-9 >= 1 and (not have_least or left_tokens + 1e-9 >= least):
        c, to = heap[0][1], heap[0][2]
        frm = alloc[c]
        need_tokens = tokens[c, to] - tokens[c, frm] if by_tokens else 0.0
        need_samples = to - frm
        if need_tokens > left_tokens + 1e-9 or need_samples > left_samples + 1e-9:
            # an entry re-enters with the best block that still fits, if one may
            if frm == 0 and min_n <= left_samples + 1e-9 and smallest[c] <= left_tokens + 1e-9:
                best_k, best_ppt = -1, 0.0
                for k in range(blocks):
                    ppt = block_ppt[c, k]
                    if (ppt > best_ppt and tokens[c, min_n + k] - tokens[c, 0] <= left_tokens + 1e-9
                            and min_n + k <= left_samples + 1e-9):
                        best_k, best_ppt = k, ppt
                if best_k >= 0:
                    heapq.heapreplace(heap, (-best_ppt, c, min_n + best_k))
                    continue
            heapq.heappop(heap)
            if not have_least:
                least, have_least = _fewest(tokens, live, min_n), True
            continue
        left_tokens -= need_tokens
        left_samples -= need_samples
        alloc[c] = to
        if to < max_n:
            d = tokens[c, to + 1] - tokens[c, to]
            step_ppt = (gain[c, to + 1] - gain[c, to] - cost[c, to + 1] + cost[c, to]) / (1e-12 if d < 1e-12 else d)
            if step_ppt > 0:
                heapq.heapreplace(heap, (-step_ppt, c, to + 1))
                continue
        heapq.heappop(heap)
    return alloc


def _posterior_tables(alpha: np.ndarray, beta: np.ndarray, tok_rollout: np.ndarray, tok_verify: np.ndarray,
                      tok_update: np.ndarray, width: int, value: float, n0: float, kappa_rollout: float,
                      kappa_verify: float, kappa_update: float, kappa_scale: float):
    """pricing.group_economics with `posterior` on the row n = 0..width − 1: the (P, width) tables P_inf, G, C, T
    at their expectation over each prompt's Beta(α, β) (E[pⁿ] as beta_power_mean's running product); (P,) inputs."""
    num = alpha.shape[0]
    informative, gain, cost, tokens = (np.empty((num, width)), np.empty((num, width)), np.empty((num, width)),
                                       np.empty((num, width)))
    for c in range(num):
        a, b = alpha[c], beta[c]
        spread = 4.0 * a * b / ((a + b) * (a + b + 1.0))
        stays_pass, stays_fail = 1.0, 1.0  # E[pⁿ] and E[(1 − p)ⁿ]
        for n in range(width):
            if n > 0:
                k = float(n - 1)
                stays_pass, stays_fail = stays_pass * ((a + k) / (a + b + k)), stays_fail * ((b + k) / (b + a + k))
            x = float(n)
            p_inf = 1.0 - stays_pass - stays_fail if n >= 2 else 0.0
            d = x + n0
            g = value * spread * (x - 1.0) / (1e-12 if d < 1e-12 else d) if n >= 2 else 0.0
            tr, tv, tu = x * tok_rollout[c], x * tok_verify[c], p_inf * x * tok_update[c]
            informative[c, n], gain[c, n] = p_inf, g
            cost[c, n] = kappa_scale * (kappa_rollout * tr + kappa_verify * tv + kappa_update * tu)
            tokens[c, n] = tr + tv + tu
    return informative, gain, cost, tokens


def _numba():
    """numba, imported on first use (~0.5 s); None when it is not installed (the `fast` extra) or when
    MARGINAL_RL_KERNELS=0 asks for the numpy/Python code."""
    if os.environ.get("MARGINAL_RL_KERNELS", "1") == "0":
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


@functools.cache
def posterior_tables() -> Callable | None:
    """The compiled _posterior_tables, or None (_numba)."""
    numba = _numba()
    return None if numba is None else numba.njit(_posterior_tables)


@functools.cache
def greedy() -> Callable | None:
    """The compiled _greedy, or None (_numba)."""
    global _min_nan, _fewest
    numba = _numba()
    if numba is None:
        return None
    _min_nan, _fewest = numba.njit(_min_nan), numba.njit(_fewest)  # what _greedy calls
    return numba.njit(_greedy)


def plain(x) -> np.ndarray:
    """x as a C-contiguous, writable float64 array (a copy only when it is not one): the one array type the kernels
    are compiled for (a read-only or strided view would compile them again, ~2 s, in the middle of a step)."""
    return np.require(x, dtype=np.float64, requirements=["C", "W"])


def warm() -> None:
    """Compile both kernels now (on tiny tables of the planner's types), so that their ~2 s of compiling is the run's
    start-up, not its first step's budget time; nothing without numba."""
    tables, allocate = posterior_tables(), greedy()
    if tables is None or allocate is None:
        return
    one = np.ones(1)
    tables(one, one, one, one, one, 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    allocate(np.ones((1, 3)), np.zeros((1, 3)), np.arange(3.0)[None, :], 2, 2, 1.0, 1.0, True)

