"""Compiled kernels for the budget's hot loops (numba, the optional `fast` extra; `dev` includes it).

Each kernel is a pure function of this file compiled by numba and repeats its numpy/Python original's arithmetic on
the same float64 values in the same order (numba compiles without fast-math: nothing is reassociated or fused; sums
run over the rows in index order, as np.bincount's; exp stays in numpy, computed by the caller), so every result is
the same bit for bit (tests/unit/test_budget_pricing.py checks each against its original, NaNs included):

    greedy            pricing.allocate_greedy, its set-up included (the same tie-breaks and heap pop order)
    posterior_tables  the planner's (P, K) tables at the posterior's expectation (policies.base.group_tables)
    pilot_tables      pricing.pilot_group_economics at the posterior (not `exact`)
    prices            pricing.price_arrays, every price component of every trajectory
    marginal_fates    policies.marginal.fates_marginal, pricing.consistent_admission's check included
    pool_prior        policies.base.pool_prior's arithmetic, after its family counts are read

Each replaces tens of numpy calls on 128-256 element arrays, whose per-call overhead (1-3 µs hot, 3-16 µs right after
the trainer's torch work has evicted the caches) was most of the budget's step. They are compiled once per process,
when a `marginal` Budget is built (warm; ~3 s), and not cached on disk: in development numba's cache once served a
kernel compiled from an earlier version of this file, which would change results without a trace. Each accessor
returns None without numba, or with MARGINAL_RL_KERNELS=0: the callers then run their numpy/Python code (the plain
functions below stay importable either way, uncompiled).
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
    at their expectation over each prompt's Beta(α, β) (E[pⁿ] as beta_power_mean's running product), as one
    (4, P, width) array; (P,) inputs."""
    num = alpha.shape[0]
    tables = np.empty((4, num, width))  # one array handed back, not four
    informative, gain, cost, tokens = tables[0], tables[1], tables[2], tables[3]
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
    return tables


def _max(a: float, b: float) -> float:
    """np.maximum of two floats: NaN if either is."""
    return a if a >= b or a != a else b


def _min(a: float, b: float) -> float:
    """np.minimum of two floats: NaN if either is."""
    return a if a <= b or a != a else b


def _groups(group: np.ndarray) -> int:
    """int(group.max()) + 1, 0 for no rows."""
    out = 0
    for g in group:
        out = max(out, g + 1)
    return out


def _prices(rewards: np.ndarray, group: np.ndarray, tokens_update: np.ndarray, dep: np.ndarray,
            stale: bool, value: float, n0: float, kappa_update: float, risk_aversion: float, risk_k: float,
            eps: float):
    """pricing.price_arrays on (N,) float64 rewards and update tokens and int64 dense groups; `dep` (N,): the
    depreciation D, computed by the caller (numpy's exp), read only when `stale`. Each group's sums run over its
    members in index order, as np.bincount's. Returns the (9, N) rows advantage, gain, cost, risk, risk_variance,
    risk_staleness, depreciation, price, gain_fresh, and zero_var (N,) (two arrays to hand back, not ten: each costs
    the call ~1 µs)."""
    num, num_groups = rewards.shape[0], _groups(group)
    count, mean, var, mass = np.zeros(num_groups), np.zeros(num_groups), np.zeros(num_groups), np.zeros(num_groups)
    for i in range(num):
        count[group[i]] += 1.0
        mean[group[i]] += rewards[i]
    for g in range(num_groups):
        mean[g] = mean[g] / _max(count[g], 1.0)
    dev = np.empty(num)
    for i in range(num):
        dev[i] = rewards[i] - mean[group[i]]
        var[group[i]] += dev[i] * dev[i]
    std = np.empty(num_groups)
    for g in range(num_groups):
        var[g] = var[g] / _max(count[g], 1.0)
        std[g] = math.sqrt(var[g])
    rows = np.empty((9, num))
    adv, gain, cost, risk, risk_variance, risk_staleness, depreciation, price, gain0 = (
        rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7], rows[8])
    abs_adv, zero_var = np.empty(num), np.empty(num, dtype=np.bool_)
    for i in range(num):
        g = group[i]
        zero_var[i] = std[g] <= eps
        adv[i] = 0.0 if zero_var[i] else dev[i] / _max(std[g], eps)
        abs_adv[i] = abs(adv[i])
        mass[g] += abs_adv[i]
    for i in range(num):
        g = group[i]
        group_gain = value * 4.0 * var[g] * count[g] / (count[g] + n0)
        gain0[i] = 0.0 if zero_var[i] else group_gain * (abs_adv[i] / _max(mass[g], eps))
        rel_err = _min(1.0, 1.0 / _max(math.sqrt(count[g]) * abs_adv[i], eps))
        at_risk = risk_aversion * risk_k * gain0[i]
        risk_variance[i] = at_risk * rel_err
        if stale:
            depreciation[i], risk_staleness[i], gain[i] = dep[i], at_risk * (1.0 - dep[i]), gain0[i] * dep[i]
        else:
            depreciation[i], risk_staleness[i], gain[i] = 1.0, 0.0, gain0[i]
        cost[i] = kappa_update * tokens_update[i]
        risk[i] = risk_variance[i] + risk_staleness[i]
        price[i] = gain[i] - cost[i] - risk[i]
    return rows, zero_var


def _marginal_fates(price: np.ndarray, gain_fresh: np.ndarray, cost: np.ndarray, risk_variance: np.ndarray,
                    rewards: np.ndarray, group: np.ndarray, zero_var: np.ndarray, eps: float, trained: int,
                    zero_signal: int, dropped_price: int, dropped_stale: int) -> np.ndarray:
    """policies.marginal.fates_marginal, with pricing.consistent_admission's group statistics over the admitted
    members in index order (the fate codes passed in: records.FATES)."""
    num, num_groups = price.shape[0], _groups(group)
    count, mean, var = np.zeros(num_groups), np.zeros(num_groups), np.zeros(num_groups)
    for i in range(num):
        if price[i] > 0:
            count[group[i]] += 1.0
            mean[group[i]] += rewards[i]
    for g in range(num_groups):
        mean[g] = mean[g] / _max(count[g], 1.0)
    for i in range(num):
        if price[i] > 0:
            d = rewards[i] - mean[group[i]]
            var[group[i]] += d * d
    fates = np.empty(num, dtype=np.int8)
    for i in range(num):
        g = group[i]
        if zero_var[i]:
            fates[i] = zero_signal
        elif price[i] > 0 and count[g] >= 2 and var[g] / _max(count[g], 1.0) > eps * eps:
            fates[i] = trained
        elif price[i] > 0 or not gain_fresh[i] - cost[i] - risk_variance[i] > 0:
            fates[i] = dropped_price
        else:
            fates[i] = dropped_stale
    return fates


def _pilot_tables(alpha: np.ndarray, beta: np.ndarray, k: np.ndarray, s: np.ndarray, flat: np.ndarray, width: int,
                  tok_rollout: np.ndarray, tok_verify: np.ndarray, tok_update: np.ndarray, value: float, n0: float,
                  kappa_rollout: float, kappa_verify: float, kappa_update: float, kappa_scale: float):
    """pricing.pilot_group_economics at the posterior (not `exact`) on m = 0..width − 1: the (P, width) tables P_inf,
    G, C, T as one (4, P, width) array, each cell's arithmetic in numpy's order (E[p^m] as beta_power_mean's running
    product)."""
    num = alpha.shape[0]
    tables = np.empty((4, num, width))  # one array handed back, not four
    informative, gain, cost, tokens = tables[0], tables[1], tables[2], tables[3]
    for c in range(num):
        a, b, kc, sc = alpha[c], beta[c], k[c], s[c]
        conc, mu = a + b, a / (a + b)
        stays_pass, stays_fail = 1.0, 1.0  # E[p^m] and E[(1 − p)^m]
        first = 0.0  # P_inf at m = 0
        for n in range(width):
            if n > 0:
                j = float(n - 1)
                stays_pass, stays_fail = stays_pass * ((a + j) / (a + b + j)), stays_fail * ((b + j) / (b + a + j))
            m = float(n)
            widen = (conc + m) / (conc + 1.0)
            mm = m * mu
            x2 = m * mu * (1.0 - mu) * widen + mm * mm  # E[X²]
            size = kc + m
            spread = 4.0 * ((sc + m * mu) / size - (sc * sc + 2.0 * sc * m * mu + x2) / (size * size))
            gain[c, n] = value * spread * size / (size + n0) if size >= 2 else 0.0
            p_inf = (1.0 - (stays_pass if sc >= kc / 2 else stays_fail)) if flat[c] else 1.0
            p_inf = p_inf if size >= 2 else 0.0
            if n == 0:
                first = p_inf
            update = (p_inf * size - first * kc) * tok_update[c]
            tr, tv = m * tok_rollout[c], m * tok_verify[c]
            informative[c, n] = p_inf
            cost[c, n] = kappa_scale * (kappa_rollout * tr + kappa_verify * tv + kappa_update * update)
            tokens[c, n] = tr + tv + update
    return tables


def _pool_prior(alpha: np.ndarray, beta: np.ndarray, pooled: np.ndarray, fam_s: np.ndarray, fam_f: np.ndarray,
                probed: np.ndarray, probe_s: np.ndarray, probe_f: np.ndarray, with_probes: bool, m: np.ndarray,
                prior_alpha: float, prior_beta: float):
    """policies.base.pool_prior on (P,) arrays: the family's counts (and, `with_probes`, its probes' added) over
    each prompt's own, at each one's strength m. Returns (alpha, beta)."""
    num = alpha.shape[0]
    out_alpha, out_beta = np.empty(num), np.empty(num)
    for i in range(num):
        pool, s, f = pooled[i], fam_s[i], fam_f[i]
        if with_probes:
            pool, s, f = pool or probed[i], s + probe_s[i], f + probe_f[i]
        own_s, own_f = alpha[i] - prior_alpha, beta[i] - prior_beta
        others_s, others_f = _max(s - own_s, 0.0), _max(f - own_f, 0.0)
        mu = (others_s + prior_alpha) / (others_s + others_f + prior_alpha + prior_beta)
        out_alpha[i] = m[i] * mu + own_s if pool else alpha[i]
        out_beta[i] = m[i] * (1 - mu) + own_f if pool else beta[i]
    return out_alpha, out_beta


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
def _compiled() -> dict[str, Callable] | None:
    """Every kernel, compiled on its first call, by name; None (_numba)."""
    global _min_nan, _fewest, _max, _min, _groups
    numba = _numba()
    if numba is None:
        return None
    _min_nan, _fewest, _max, _min, _groups = (numba.njit(f) for f in (_min_nan, _fewest, _max, _min, _groups))
    return {f.__name__.lstrip("_"): numba.njit(f) for f in (_greedy, _posterior_tables, _prices, _marginal_fates,
                                                           _pilot_tables, _pool_prior)}


def _kernel(name: str) -> Callable | None:
    kernels = _compiled()
    return None if kernels is None else kernels[name]


def greedy() -> Callable | None:
    """The compiled _greedy, or None (_numba); likewise each accessor below."""
    return _kernel("greedy")


def posterior_tables() -> Callable | None:
    return _kernel("posterior_tables")


def prices() -> Callable | None:
    return _kernel("prices")


def marginal_fates() -> Callable | None:
    return _kernel("marginal_fates")


def pilot_tables() -> Callable | None:
    return _kernel("pilot_tables")


def pool_prior() -> Callable | None:
    return _kernel("pool_prior")


def plain(x, dtype: type = np.float64) -> np.ndarray:
    """x as a C-contiguous, writable array of `dtype` (a copy only when it is not one): the one array type the
    kernels are compiled for (a read-only or strided view would compile them again, ~2 s, in the middle of a step)."""
    if type(x) is np.ndarray and x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable:
        return x
    return np.require(x, dtype=dtype, requirements=["C", "W"])


def warm() -> None:
    """Compile every kernel now (on tiny inputs of the callers' types), so that their ~3 s of compiling is the run's
    start-up, not its first step's budget time; nothing without numba."""
    if _compiled() is None:
        return
    one, row, group = np.ones(1), np.ones((1, 3)), np.zeros(1, dtype=np.int64)
    greedy()(row, np.zeros((1, 3)), np.arange(3.0)[None, :], 2, 2, 1.0, 1.0, True)
    posterior_tables()(one, one, one, one, one, 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    pilot_tables()(one, one, one, one, np.ones(1, dtype=np.bool_), 3, one, one, one, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    *_, zero_var = prices()(one, group, one, one, True, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-6)
    marginal_fates()(one, one, one, one, one, group, zero_var, 1e-6, 0, 1, 2, 3)
    pool_prior()(one, one, zero_var, one, one, zero_var, one, one, True, one, 1.0, 1.0)
