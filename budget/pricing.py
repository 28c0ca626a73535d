"""The price formulas, as pure vectorised numpy functions: arrays in, arrays out, no state, no objects. (The greedy
allocator, the planner's and the pilot's posterior tables and the trajectory prices run as budget/kernels.py's numba
kernels when numba is installed: the same numbers, bit for bit.)

    price_i = V·ΔQ_i − ΔC_i − ρ·ΔR_i                                   (seed paper, arXiv 2605.01214)

Before rollout, for a prompt with pass rate p and a group of n samples (0/1 rewards; graded rewards in [0, 1] use
the mean reward as p, i.e. the Bernoulli with the same mean):
    P_inf(n)   = 1 − pⁿ − (1 − p)ⁿ                  chance the group's rewards differ (it carries a signal)
    E[4σ̂²|inf] = 4p(1 − p)(n − 1)/n / P_inf(n)     how much an informative group teaches (σ̂²: its reward variance)
    G(n)       = V · P_inf(n) · E[4σ̂²|inf] · n/(n + n0) = V · 4p(1 − p)(n − 1)/(n + n0)
    T(n)       = n·(L_rollout + L_verify) + P_inf(n)·n·L_update      expected tokens (only informative groups train)
    C(n)       = n·(κ_r·L_rollout + κ_v·L_verify) + κ_u·P_inf(n)·n·L_update
n/(n + n0) is the precision of the group's gradient estimate (signal n·g against noise: the optimal-step gain of a
noisy gradient is |g|²·n/(n + n0)); it makes G concave in n for n ≥ 2, so one-sample increments are handed out in
the order of their price, as the equimarginal rule asks.

After rollout, group g with n members, rewards r, mean r̄, population variance σ̂², advantages A = (r − r̄)/σ̂:
    G_g     = V · 4σ̂² · n/(n + n0)        realised group gain (its expectation over the rewards is G(n) above)
    g⁰_i    = G_g · |A_i| / Σ_j |A_j|      the trajectory's share
    D_i     = exp(−δ · Δv_i / s)           staleness depreciation: drift δ per version, Δv versions behind, s drift_scale
    gain_i  = g⁰_i · D_i
    cost_i  = κ_u · update tokens           (rollout tokens are sunk: they do not count)
    risk_i  = ρ·k·(g⁰_i · min(1, 1/(√n·|A_i|)) + g⁰_i · (1 − D_i))
the first risk term is the relative error of the advantage from the baseline's standard error σ̂/√n (small groups,
members near the mean), the second the part of the gain lost to drift; k = 1 (std) or φ(Φ⁻¹(α))/α (CVaR_α shortfall
of a normal with that std).

With a pilot (budget.pilot_samples): group g's first k samples are drawn, with rewards summing to s, before the rest
are priced. With p ~ Beta(α, β) the posterior after the pilot, and X ~ BetaBinomial(m, α, β) the successes among m
more samples (n = k + m in all, c = α + β, μ = α/c; an exact p is c = ∞):
    E[X] = mμ,  Var[X] = mμ(1 − μ)(c + m)/(c + 1),  r̄ = (s + X)/n
    G(n | pilot)    = V·4(E[r̄] − E[r̄²])·n/(n + n0)           (m = 0: the pilot's realised gain)
    P_inf(n | pilot) = 1 for a mixed pilot; 1 − E[p^m] after an all-pass one, 1 − E[(1 − p)^m] after an all-fail one
and the continuation's gain, cost and tokens are those of the whole group minus the pilot's: its rollout tokens are
sunk, and its update tokens count once the group is informative. Averaged over the pilot's outcomes, G(n | pilot)
and P_inf(n | pilot) are G(n) and P_inf(n) above, exactly (the law of total expectation).
"""

from __future__ import annotations

import heapq
import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from marginal_rl.budget import kernels

EPS = 1e-6  # a standard deviation (or a sum of |advantages|) at or below this is zero


def informative_prob(p: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """P(a group of n samples with pass rate p has rewards that differ) = 1 − pⁿ − (1 − p)ⁿ; 0 for n ≤ 1."""
    p, n = np.asarray(p, dtype=float), np.asarray(n)
    return np.where(n >= 2, 1.0 - p**n - (1.0 - p) ** n, 0.0)


def expected_group_gain(p: np.ndarray | float, n: np.ndarray | int, value: float, n0: float) -> np.ndarray:
    """G(n) = V·4p(1 − p)(n − 1)/(n + n0): the expected realised gain of a group of n (0 for n ≤ 1)."""
    p = np.asarray(p, dtype=float)
    return _gain(4.0 * p * (1.0 - p), n, value, n0)


def _gain(spread, n, value: float, n0: float) -> np.ndarray:
    """G(n) = V·spread·(n − 1)/(n + n0), spread = 4p(1 − p) or its posterior expectation (0 for n ≤ 1)."""
    n = np.asarray(n, dtype=float)
    return np.where(n >= 2, value * spread * (n - 1.0) / np.maximum(n + n0, 1e-12), 0.0)


def beta_power_mean(alpha: np.ndarray, beta: np.ndarray, n: np.ndarray) -> np.ndarray:
    """E[pⁿ] for p ~ Beta(α, β) and integers n ≥ 0: Π_{k<n} (α + k)/(α + β + k). α, β (P,); n a (1, K) row (a
    (P, K) table) or (P,) (one value each)."""
    alpha, beta, n = np.asarray(alpha, dtype=float), np.asarray(beta, dtype=float), np.asarray(n, dtype=np.int64)
    ks = np.arange(max(int(n.max(initial=0)), 0))
    steps = (alpha[:, None] + ks) / ((alpha + beta)[:, None] + ks)
    table = np.concatenate([np.ones((len(alpha), 1)), np.cumprod(steps, axis=1)], axis=1)  # (P, n_max + 1)
    return table[:, n[0]] if n.ndim == 2 else table[np.arange(len(alpha)), n]


def posterior_spread(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """E[4p(1 − p)] for p ~ Beta(α, β) = 4αβ/((α + β)(α + β + 1)): the posterior expectation of G's p-factor."""
    alpha, beta = np.asarray(alpha, dtype=float), np.asarray(beta, dtype=float)
    return 4.0 * alpha * beta / ((alpha + beta) * (alpha + beta + 1.0))


def posterior_informative_prob(alpha: np.ndarray, beta: np.ndarray, n: np.ndarray) -> np.ndarray:
    """E[P_inf(n)] for p ~ Beta(α, β) = 1 − E[pⁿ] − E[(1 − p)ⁿ] (1 − p ~ Beta(β, α)); 0 for n ≤ 1."""
    n, num = np.asarray(n), len(alpha)
    if n.ndim == 2:  # E[pⁿ] and E[(1 − p)ⁿ] in one pass over the stacked rows, as each would be alone
        powers = beta_power_mean(np.concatenate([alpha, beta]), np.concatenate([beta, alpha]), n)
        both = 1.0 - powers[:num] - powers[num:]
    else:
        both = 1.0 - beta_power_mean(alpha, beta, n) - beta_power_mean(beta, alpha, n)
    return np.where(n >= 2, both, 0.0)


def group_economics(p, n, tok_rollout, tok_verify, tok_update, *, value: float, n0: float, kappa_rollout: float,
                    kappa_verify: float, kappa_update: float, kappa_scale: float = 1.0, posterior=None):
    """(P_inf(n), G(n), C(n), T(n)) of groups of n at pass rate p, with expected tokens per sample by use: update
    tokens only when the group is informative; every κ multiplied by kappa_scale (the controller's multiplier).
    `posterior` = (α, β): their expectations over p ~ Beta(α, β) instead (p unread), exact because G is linear in
    4p(1 − p) and T, C in P_inf(n)."""
    n = np.asarray(n, dtype=float)
    if posterior is None:
        informative, gain = informative_prob(p, n), expected_group_gain(p, n, value, n0)
    else:
        spread = posterior_spread(*posterior)
        informative = posterior_informative_prob(*posterior, n)
        gain = _gain(spread[:, None] if n.ndim == 2 else spread, n, value, n0)
    tr, tv, tu = n * tok_rollout, n * tok_verify, informative * n * tok_update
    cost = kappa_scale * (kappa_rollout * tr + kappa_verify * tv + kappa_update * tu)
    return informative, gain, cost, tr + tv + tu


def pilot_group_economics(alpha, beta, k, s, flat, width: int, tok_rollout, tok_verify, tok_update, *, value: float,
                          n0: float, kappa_rollout: float, kappa_verify: float, kappa_update: float,
                          kappa_scale: float = 1.0, exact: bool = False):
    """P piloted groups grown by m = 0..width − 1 more samples (module docstring, "With a pilot"): (P, width)
    tables of P_inf and G of the whole group of k + m, and C and T of the m more samples (the pilot's rollout is
    sunk; the group's update tokens count once it is informative, less the pilot's own where it already is; m = 0:
    C = T = 0). alpha, beta: the posterior after the pilot (with `exact`, p is its mean); k ≥ 1, s: the pilot's
    samples and reward sum; flat: its rewards are all equal; token lengths per sample by use; (P,) each. At the
    posterior (not `exact`) compiled when numba is installed (kernels.pilot_tables): the same bit for bit."""
    kernel = kernels.pilot_tables() if not exact else None
    if kernel is not None:
        plain = kernels.plain
        return tuple(kernel(plain(alpha), plain(beta), plain(k), plain(s), plain(flat, np.bool_), int(width),
                            plain(tok_rollout), plain(tok_verify), plain(tok_update), float(value), float(n0),
                            float(kappa_rollout), float(kappa_verify), float(kappa_update), float(kappa_scale)))
    alpha, beta = np.asarray(alpha, dtype=float)[:, None], np.asarray(beta, dtype=float)[:, None]
    k, s = np.asarray(k, dtype=float)[:, None], np.asarray(s, dtype=float)[:, None]
    m = np.arange(width, dtype=float)[None, :]
    conc, mu = alpha + beta, alpha / (alpha + beta)
    widen = 1.0 if exact else (conc + m) / (conc + 1.0)
    x2 = m * mu * (1.0 - mu) * widen + (m * mu) ** 2  # E[X²]
    size = k + m
    spread = 4.0 * ((s + m * mu) / size - (s * s + 2.0 * s * m * mu + x2) / size**2)
    gain = np.where(size >= 2, value * spread * size / (size + n0), 0.0)
    if exact:
        stays_pass, stays_fail = mu**m, (1.0 - mu) ** m
    else:
        ms = np.arange(width)[None, :]
        a, b = alpha[:, 0], beta[:, 0]
        powers = beta_power_mean(np.concatenate([a, b]), np.concatenate([b, a]), ms)  # both in one pass
        stays_pass, stays_fail = powers[:len(a)], powers[len(a):]
    flat = np.asarray(flat, dtype=bool)[:, None]
    passed = s >= k / 2  # a flat pilot's side (0/1 rewards: all pass or all fail)
    informative = np.where(flat, 1.0 - np.where(passed, stays_pass, stays_fail), 1.0)
    informative = np.where(size >= 2, informative, 0.0)
    update = (informative * size - informative[:, :1] * k) * np.asarray(tok_update, dtype=float)[:, None]
    tr, tv = m * np.asarray(tok_rollout, dtype=float)[:, None], m * np.asarray(tok_verify, dtype=float)[:, None]
    cost = kappa_scale * (kappa_rollout * tr + kappa_verify * tv + kappa_update * update)
    return informative, gain, cost, tr + tv + update


def risk_factor(measure: str, alpha: float) -> float:
    """k: 1 for the std, or φ(Φ⁻¹(α))/α, the CVaR_α shortfall (mean minus lower-tail mean) of a unit normal."""
    if measure == "std":
        return 1.0
    z = NormalDist().inv_cdf(alpha)
    return float(np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi) / alpha)


def depreciation(staleness: np.ndarray | float, drift: float, drift_scale: float) -> np.ndarray:
    """D = exp(−δ·Δv/s): the weight left after Δv versions of drift δ (nats/token/version); s = drift_scale."""
    return np.exp(-drift * np.maximum(np.asarray(staleness, dtype=float), 0.0) / drift_scale)


def fade_posterior(alpha, beta, prior_alpha: float, prior_beta: float, factor):
    """Shrink the evidence (pseudo-counts above the prior) by `factor`; the prior itself never fades."""
    return prior_alpha + (alpha - prior_alpha) * factor, prior_beta + (beta - prior_beta) * factor  # scalars or arrays


DISPERSION_GUESS_PAIRS = 56.0  # the guess 1/(m + 1) weighs as the 8·7 ordered pairs of one group of eight
DISPERSION_GUESS_PROBES = 8.0  # ... or, from the probe's rates, as 8 probes (the plug-in spread of n is low by 1/n)
STRENGTH_MIN, STRENGTH_MAX = 0.5, 64.0  # the family prior's strength k is kept within these (docs/budget.md)


def family_strength(successes, failures, pair_successes, pairs, guess: float,
                    guess_weight: float = DISPERSION_GUESS_PAIRS):
    """Empirical Bayes (budget.pool_dispersion): each family's prior strength k in Beta(k·μ, k·(1 − μ)), estimated
    from how much its groups agree. A family's prompts have pass rates p of mean μ and variance σ²; within a group of
    n samples of one prompt, any two different samples both pass with probability E[p²] = μ² + σ², so over the
    family's groups Q = Σ (s² − Σr²) (= Σ s(s − 1) for 0/1 rewards) counts the passing ordered pairs among its
    M = Σ n(n − 1) pairs, and
        ρ̂ = (Q/M − μ²) / (μ(1 − μ)),   μ = S/(S + F)
    is the intra-class correlation of its rewards, clipped to [0, 1] (0 where μ(1 − μ) = 0: no spread seen). A Beta
    prior of strength k has ρ = 1/(k + 1); the estimate is shrunk to the guess ρ₀ = 1/(guess + 1) (pool_strength),
    which counts as M₀ = `guess_weight` pairs: ρ = (M·ρ̂ + M₀·ρ₀)/(M + M₀), and k = 1/ρ − 1 within [STRENGTH_MIN,
    STRENGTH_MAX]. A family whose prompts are each solved or not (ρ → 1) gets a weak prior, so one prompt's own
    samples decide it; one whose prompts all sit at its rate (ρ → 0), a strong one. Arrays (P,) or scalars, faded
    counts; the pairs' counts fade as the family's do.

    The same formula reads the likelihood probe's pass rates (budget.dispersion_source: probes): with S = Σ r,
    F = Σ (1 − r), Q = Σ r² and M the number of probes, Q/M − μ² is the plug-in variance of the probed prompts' rates,
    which the plan's choice of groups does not bias (a family's unseen prompts share one price, so those it probes are
    a draw of them); M₀ = DISPERSION_GUESS_PROBES there."""
    s, f, q, m = (np.asarray(x, dtype=float) for x in (successes, failures, pair_successes, pairs))
    total = s + f
    mu = np.divide(s, total, out=np.zeros_like(total), where=total > 0)
    spread = mu * (1.0 - mu)
    agree = np.divide(q, m, out=np.zeros_like(m), where=m > 0) - mu * mu
    rho_hat = np.clip(np.divide(agree, spread, out=np.zeros_like(spread), where=spread > 0), 0.0, 1.0)
    rho = (m * rho_hat + guess_weight / (guess + 1.0)) / (m + guess_weight)
    return np.clip(1.0 / rho - 1.0, STRENGTH_MIN, STRENGTH_MAX)


def group_stats(rewards: np.ndarray, group: np.ndarray,
                num_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (count, mean, population variance) of the rewards, and each reward's deviation from its group's
    mean (N,). `group` holds dense ids 0..num_groups-1."""
    count = np.bincount(group, minlength=num_groups).astype(float)
    safe = np.maximum(count, 1.0)
    mean = np.bincount(group, weights=rewards, minlength=num_groups) / safe
    dev = rewards - mean[group]
    var = np.bincount(group, weights=dev * dev, minlength=num_groups) / safe
    return count, mean, var, dev


class PriceComponents(NamedTuple):
    """Every price component of N trajectories, (N,) each (see the module docstring for the formulas)."""

    advantage: np.ndarray  # (r − r̄)/σ̂ over the whole group; 0 in a zero-variance group
    gain: np.ndarray  # g⁰·D
    cost: np.ndarray  # κ_u · update tokens
    risk: np.ndarray  # risk_variance + risk_staleness
    risk_variance: np.ndarray
    risk_staleness: np.ndarray
    depreciation: np.ndarray  # D
    price: np.ndarray  # gain − cost − risk
    gain_fresh: np.ndarray  # g⁰: the gain before staleness depreciation
    zero_var: np.ndarray  # bool: the trajectory's group has rewards that are all equal


def price_arrays(rewards: np.ndarray, group: np.ndarray, tokens_update: np.ndarray, staleness: np.ndarray, *,
                 value: float, n0: float, kappa_update: float, drift: float, drift_scale: float,
                 risk_aversion: float, risk_k: float, eps: float = EPS) -> PriceComponents:
    """Price N trajectories at once (all arrays (N,))."""
    rewards = np.asarray(rewards, dtype=float)
    group = np.asarray(group, dtype=np.int64)
    staleness = np.asarray(staleness)
    kernel = kernels.prices()
    if kernel is not None:  # the same arithmetic compiled (budget/kernels.py), bit for bit
        stale, rewards = np.count_nonzero(staleness) > 0, kernels.plain(rewards)
        dep = kernels.plain(depreciation(staleness, drift, drift_scale)) if stale else rewards  # unread if fresh
        rows, zero_var = kernel(rewards, kernels.plain(group, np.int64), kernels.plain(tokens_update), dep, stale,
                                float(value), float(n0), float(kappa_update), float(risk_aversion), float(risk_k),
                                float(eps))
        return PriceComponents(*rows, zero_var=zero_var)
    num_groups = int(group.max()) + 1 if group.size else 0
    count, _, var, dev = group_stats(rewards, group, num_groups)
    std = np.sqrt(var)
    zero_var = (std <= eps)[group]
    adv = np.where(zero_var, 0.0, dev / np.maximum(std, eps)[group])
    abs_adv = np.abs(adv)
    adv_mass = np.bincount(group, weights=abs_adv, minlength=num_groups)  # Σ_j |A_j| per group
    group_gain = value * 4.0 * var * count / (count + n0)
    share = abs_adv / np.maximum(adv_mass, eps)[group]
    gain0 = np.where(zero_var, 0.0, group_gain[group] * share)
    rel_err = np.minimum(1.0, 1.0 / np.maximum(np.sqrt(count)[group] * abs_adv, eps))
    at_risk = risk_aversion * risk_k * gain0
    risk_variance = at_risk * rel_err
    if staleness.any():
        dep = depreciation(staleness, drift, drift_scale)
        risk_staleness = at_risk * (1.0 - dep)
        gain = gain0 * dep
    else:  # on-policy: D = 1 exactly, nothing lost to drift
        dep, risk_staleness, gain = np.ones(len(rewards)), np.zeros(len(rewards)), gain0
    cost = kappa_update * np.asarray(tokens_update, dtype=float)
    risk = risk_variance + risk_staleness
    return PriceComponents(advantage=adv, gain=gain, cost=cost, risk=risk, risk_variance=risk_variance,
                           risk_staleness=risk_staleness, depreciation=dep, price=gain - cost - risk, gain_fresh=gain0,
                           zero_var=zero_var)


def consistent_admission(admit: np.ndarray, rewards: np.ndarray, group: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Drop the admitted members of any group whose admitted subset has fewer than 2 members or equal rewards: the
    trainer recomputes advantages over admitted members, so such a subset would carry no signal."""
    if not admit.any():
        return admit
    num_groups = int(group.max()) + 1
    sel = group[admit]
    count, _, var, _ = group_stats(rewards[admit], sel, num_groups)
    ok = (count >= 2) & (var > eps * eps)
    return admit & ok[group]


def max_variance_keep(rewards: np.ndarray, group: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(N,) mask of the members of every group's size-keep[g] subset with the largest reward variance (PODS, arXiv
    2504.13818: it is always the top k and bottom m − k rewards for some k, so the m + 1 candidates are checked, the
    most balanced split first; ties keep the earlier). All groups at once: groups of one size and keep are searched
    together."""
    num_groups = len(keep)
    count = np.bincount(group, minlength=num_groups)
    order = np.lexsort((rewards, group))  # by group, then reward; ties in index order, as argsort(kind="stable")
    start = np.cumsum(count) - count
    ranked = rewards[order]
    mask = np.zeros(len(rewards), dtype=bool)
    for n, m in set(zip(count.tolist(), keep.tolist(), strict=True)):
        pos = start[(count == n) & (keep == m), None] + np.arange(n)  # (g, n) positions in `order`, by reward
        if m >= n:
            mask[order[pos]] = True
            continue
        # candidate k (most balanced split first) = the top k and bottom m − k, as positions in a sorted row
        ks = sorted(range(m + 1), key=lambda k: abs(2 * k - m))
        picks = np.array([list(range(n - k, n)) + list(range(m - k)) for k in ks])  # (m + 1, m)
        r = ranked[pos[:, picks]]  # (g, m + 1, m)
        dev = r - r.sum(axis=2, keepdims=True) / m
        var = ((dev * dev).sum(axis=2) / m).tolist()  # np.var(r, axis=2), the same operations without its overhead
        best = []
        for row in var:  # the first candidate that beats all before it by more than 1e-12 (ties keep the earlier)
            b = 0
            for i in range(1, m + 1):
                if row[i] > row[b] + 1e-12:
                    b = i
            best.append(b)
        mask[order[np.take_along_axis(pos, picks[best], axis=1)]] = True
    return mask


def allocate_greedy(gain: np.ndarray, cost: np.ndarray, tokens: np.ndarray, min_n: int, max_n: int, *,
                    max_samples: float | None = None, max_tokens: float | None = None,
                    compiled: bool | None = None) -> np.ndarray:
    """Greedy allocation of samples to P prompts, next sample to the highest price per token.

    gain, cost, tokens: (P, max_n + 1) totals G(n), C(n), T(n) for n = 0..max_n. A prompt enters with a block of
    n ∈ [min_n, max_n] samples, the size with the best price per token (G(n)/n rises before it falls, and a group
    smaller than min_n cannot be trained on), then grows one sample at a time. Stops when the best price is not
    positive or nothing fits the limits: at most `max_samples` samples and `max_tokens` expected tokens (None or
    inf: no such limit). An entry block that does not fit is replaced by the best block that does, and an increment
    that does not fit is dropped, so the limits are spent exactly wherever the prices allow it.

    `compiled`: run budget/kernels.py's numba kernel (the default when numba is installed: the `fast` extra) or the
    Python loop below; the allocation is the same bit for bit."""
    num = gain.shape[0]
    if num == 0 or max_n < min_n or min_n < 1:
        return np.zeros(num, dtype=np.int64)
    left_samples = math.inf if max_samples is None else float(max_samples)
    left_tokens = math.inf if max_tokens is None else float(max_tokens)
    by_tokens = math.isfinite(left_tokens)  # else tokens cannot fail to fit: their arithmetic is skipped
    gain, cost = gain[:, :max_n + 1], cost[:, :max_n + 1]
    tokens = np.ascontiguousarray(tokens[:, :max_n + 1], dtype=float)
    kernel = kernels.greedy() if compiled is not False else None
    if compiled and kernel is None:
        raise RuntimeError("allocate_greedy(compiled=True) needs numba: pip install -e '.[fast]'")
    if kernel is not None:
        return kernel(kernels.plain(gain), kernels.plain(cost), kernels.plain(tokens), int(min_n), int(max_n),
                      left_samples, left_tokens, by_tokens)
    block_tokens = tokens[:, min_n:]  # (P, K) entry blocks of n = min_n..max_n
    block_ppt = (gain[:, min_n:] - cost[:, min_n:]) / np.maximum(block_tokens, 1e-12)  # per token
    entry = np.argmax(block_ppt, axis=1)
    entry_ppt = block_ppt[np.arange(num), entry]
    live = np.flatnonzero(entry_ppt > 0)
    # step_ppt[c, n]: price per token of prompt c's sample n + 1 when it has n, (P, max_n)
    step_ppt = memoryview((gain[:, 1:] - gain[:, :-1] - cost[:, 1:] + cost[:, :-1])
                          / np.maximum(tokens[:, 1:] - tokens[:, :-1], 1e-12))
    tok = memoryview(tokens)
    # what an entry block adds to the prompt's T(0) (= its tokens, for any planner's table: T(0) = 0), its cheapest
    block_need = block_tokens - tokens[:, :1]
    smallest_block = block_need.min(axis=1).tolist() if by_tokens else [0.0] * num
    alloc = [0] * num
    # Plain Python from here (memoryviews index to Python floats): a few hundred heap operations, where numpy
    # scalars would dominate. Each prompt has at most one option in the heap, so the pop order is that of the keys
    # (−price, prompt, size) alone; an option whose price is not positive is never pushed, as popping one would end
    # the allocation.
    heap = list(zip((-entry_ppt[live]).tolist(), live.tolist(), (min_n + entry[live]).tolist(), strict=True))
    heapq.heapify(heap)
    least = None if by_tokens else -math.inf  # fewest_tokens, once an option has been dropped
    # every option needs a sample, and once fewer tokens are left than any option of the prompts that entered the
    # heap needs, every option left would be dropped in turn
    while heap and left_samples + 1e-9 >= 1 and (least is None or left_tokens + 1e-9 >= least):
        _, c, to = heap[0]
        frm = alloc[c]
        need_tokens, need_samples = tok[c, to] - tok[c, frm] if by_tokens else 0.0, to - frm
        if need_tokens > left_tokens + 1e-9 or need_samples > left_samples + 1e-9:
            # an entry re-enters with the best block that still fits, if one may
            if frm == 0 and min_n <= left_samples + 1e-9 and smallest_block[c] <= left_tokens + 1e-9:
                best, best_ppt = -1, 0.0
                for k, (ppt, need) in enumerate(zip(block_ppt[c].tolist(), block_need[c].tolist(), strict=True)):
                    if ppt > best_ppt and need <= left_tokens + 1e-9 and min_n + k <= left_samples + 1e-9:
                        best, best_ppt = k, ppt
                if best >= 0:
                    heapq.heapreplace(heap, (-best_ppt, c, min_n + best))
                    continue
            heapq.heappop(heap)
            if least is None:  # the first option dropped: the end is near, and may be nearer than the heap shows
                least = fewest_tokens(tokens, live, min_n)
            continue
        left_tokens -= need_tokens
        left_samples -= need_samples
        alloc[c] = to
        if to < max_n and step_ppt[c, to] > 0:
            heapq.heapreplace(heap, (-step_ppt[c, to], c, to + 1))
        else:
            heapq.heappop(heap)
    return np.array(alloc, dtype=np.int64)


def fewest_tokens(tokens: np.ndarray, rows: np.ndarray, min_n: int) -> float:
    """The fewest tokens any option of these prompts needs in allocate_greedy: an entry block (its tokens over the
    prompt's T(0)) or a one-sample increment; `tokens` (P, max_n + 1), `rows` the prompts' indices."""
    t = tokens[rows]
    parts = (float((t[:, min_n:] - t[:, :1]).min()), float((t[:, 1:] - t[:, :-1]).min(initial=math.inf)))
    return -math.inf if any(map(math.isnan, parts)) else min(parts)  # a NaN need fits anything: never stop on it


def controller_step(scale: float, spend: float, budget: float, rate: float, lo: float, hi: float) -> float:
    """Multiplicative dual ascent on the κ multiplier: κ ← κ·exp(rate·(spend/budget − 1)), clipped to [lo, hi].
    Over budget raises every price, under budget lowers it; the fixed point spends the budget exactly."""
    return float(np.clip(scale * math.exp(min(rate * (spend / budget - 1.0), 50.0)), lo, hi))
