"""The price formulas of budget/pricing.py, each against numbers computed by hand (arithmetic in the comments)."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from marginal_rl.budget import kernels
from marginal_rl.budget.pricing import (
    allocate_greedy,
    beta_power_mean,
    consistent_admission,
    controller_step,
    depreciation,
    expected_group_gain,
    fade_posterior,
    family_strength,
    group_economics,
    informative_prob,
    max_variance_keep,
    posterior_informative_prob,
    posterior_spread,
    price_arrays,
    risk_factor,
)
from marginal_rl.budget.records import FATES


def test_informative_prob():
    # 1 − 0.5² − 0.5² = 0.5;  1 − 0.2³ − 0.8³ = 1 − 0.008 − 0.512 = 0.48;  a group of one never differs
    assert informative_prob(0.5, 2) == pytest.approx(0.5)
    assert informative_prob(0.2, 3) == pytest.approx(0.48)
    assert informative_prob(0.3, 1) == 0.0
    assert informative_prob(0.0, 8) == 0.0 and informative_prob(1.0, 8) == 0.0


def test_expected_group_gain():
    # V·4p(1−p)(n−1)/(n+n0): 1·4·0.25·7/16 = 0.4375;  2·4·0.16·2/11 = 2.56/11 = 0.232727...
    assert expected_group_gain(0.5, 8, 1.0, 8.0) == pytest.approx(0.4375)
    assert expected_group_gain(0.2, 3, 2.0, 8.0) == pytest.approx(2.56 / 11)
    assert expected_group_gain(0.5, 1, 1.0, 8.0) == 0.0


@pytest.mark.parametrize("p,n,n0", [(0.2, 3, 8.0), (0.5, 8, 8.0), (0.9, 5, 2.0)])
def test_expected_gain_is_the_mean_of_the_realised_gain(p, n, n0):
    # E over k ~ Binomial(n, p) of the realised group gain V·4σ̂²·n/(n+n0), σ̂² = (k/n)(1 − k/n).
    # n=3, p=0.2 by hand: P(k=1)=3·0.2·0.64=0.384, P(k=2)=3·0.04·0.8=0.096, σ̂²=2/9 for both,
    # E[4σ̂²] = 4·(2/9)·0.48 = 0.42667, ×3/11 = 0.116364 = 4·0.16·2/11 ✓
    expect = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) * 4 * (k / n) * (1 - k / n) * n / (n + n0)
                 for k in range(n + 1))
    assert expected_group_gain(p, n, 1.0, n0) == pytest.approx(expect)
    # and it splits as P_inf(n) · E[4σ̂² | informative] · n/(n + n0)
    teach = 4 * p * (1 - p) * (n - 1) / n / float(informative_prob(p, n))
    assert float(informative_prob(p, n)) * teach * n / (n + n0) == pytest.approx(expect)


def test_posterior_moments_by_hand():
    # Beta(1, 1): E[pⁿ] = 1/(n + 1); Beta(2, 3): E[p] = 2/5, E[p²] = 2·3/(5·6) = 0.2, E[p³] = 0.2·4/7
    assert beta_power_mean(np.array([1.0]), np.array([1.0]), np.arange(5)[None, :])[0] == pytest.approx(
        [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert beta_power_mean(np.array([2.0, 1.0]), np.array([3.0, 1.0]), np.array([3, 0])) == pytest.approx(
        [0.8 / 7, 1.0])
    # E[4p(1 − p)] = 4αβ/((α + β)(α + β + 1)): Beta(1, 1) 4/6 = 2/3, Beta(2, 3) 24/30 = 0.8, Beta(1, 3) 12/20 = 0.6
    assert posterior_spread(np.array([1.0, 2.0, 1.0]), np.array([1.0, 3.0, 3.0])) == pytest.approx([2 / 3, 0.8, 0.6])
    # E[P_inf(n)]: Beta(1, 1), n = 3: 1 − 1/4 − 1/4 = 0.5;  Beta(2, 3), n = 2: 1 − 0.2 − E[(1 − p)²] (Beta(3, 2):
    # 3·4/(5·6) = 0.4) = 0.4;  n = 1: 0
    got = posterior_informative_prob(np.array([1.0, 2.0, 2.0]), np.array([1.0, 3.0, 3.0]), np.array([3, 2, 1]))
    assert got == pytest.approx([0.5, 0.4, 0.0])
    # the (P, K) table (both powers from one pass over the stacked rows) is, bit for bit, the values one at a time
    alpha, beta = np.array([1.0, 2.0, 6.5, 0.3]), np.array([1.0, 3.0, 1.5, 9.0])
    table = posterior_informative_prob(alpha, beta, np.arange(9)[None, :])
    for n in range(9):
        assert table[:, n].tolist() == posterior_informative_prob(alpha, beta, np.full(4, n)).tolist()


def test_posterior_economics_are_the_point_economics_averaged_over_the_posterior():
    # G, C, T are linear in 4p(1 − p) and P_inf(n), so their posterior expectation is exact: check it against the
    # point economics integrated over the Beta density (midpoint rule, 20 000 cells)
    alpha, beta, n = np.array([1.0, 2.0, 6.5]), np.array([1.0, 3.0, 1.5]), np.arange(9)[None, :]
    kw = dict(value=1.5, n0=8.0, kappa_rollout=0.001, kappa_verify=0.002, kappa_update=0.003, kappa_scale=0.7)
    expected = group_economics(None, n, 17.0, 3.0, 20.0, posterior=(alpha, beta), **kw)
    x = (np.arange(20_000) + 0.5) / 20_000
    for i, (a, b) in enumerate(zip(alpha, beta, strict=True)):
        w = x ** (a - 1) * (1 - x) ** (b - 1)
        w /= w.sum()
        point = group_economics(x[:, None], n, 17.0, 3.0, 20.0, **kw)  # (cells, K) each
        for got, table in zip(expected, point, strict=True):
            assert got[i] == pytest.approx(w @ table, rel=1e-4, abs=1e-9)
    # a tight posterior is its mean: Beta(3·10⁶, 7·10⁶) prices as p = 0.3
    tight = group_economics(None, n, 17.0, 3.0, 20.0, posterior=(np.array([3e6]), np.array([7e6])), **kw)
    for got, want in zip(tight, group_economics(np.array([[0.3]]), n, 17.0, 3.0, 20.0, **kw), strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_group_economics():
    # n=4, p=0.5: rollout 4·17 = 68, verify 4·3 = 12, update P_inf·4·20 = (1 − 2/16)·80 = 70 tokens;
    # cost 2·(0.001·68 + 0.002·12 + 0.003·70) = 2·0.302 = 0.604;  gain 1·4·0.25·3/(4 + 8) = 0.25
    informative, gain, cost, tokens = group_economics(0.5, 4, 17.0, 3.0, 20.0, value=1.0, n0=8.0, kappa_rollout=0.001,
                                                      kappa_verify=0.002, kappa_update=0.003, kappa_scale=2.0)
    assert float(informative) == pytest.approx(0.875) and float(gain) == pytest.approx(0.25)
    assert float(cost) == pytest.approx(0.604) and float(tokens) == pytest.approx(68.0 + 12.0 + 70.0)


def test_posterior_fading():
    # evidence above the prior shrinks by e^-1: α = 1 + (4 − 1)·0.3679 = 2.1036, β = 1 + (2 − 1)·0.3679 = 1.3679
    a, b = fade_posterior(4.0, 2.0, 1.0, 1.0, math.exp(-1))
    assert (float(a), float(b)) == pytest.approx((2.1036, 1.3679), abs=1e-4)


def test_staleness_depreciation():
    # exp(−δ·Δv/s) = exp(−0.05·2/0.1) = e^-1 = 0.36788;  on-policy (Δv = 0) keeps everything
    assert float(depreciation(2, 0.05, 0.1)) == pytest.approx(math.exp(-1))
    assert float(depreciation(0, 0.05, 0.1)) == 1.0


def test_risk_factor():
    # std: 1; CVaR_0.1 of a unit normal: z = Φ⁻¹(0.1) = −1.28155, φ(z) = 0.175498, /0.1 = 1.75498
    assert risk_factor("std", 0.1) == 1.0
    assert risk_factor("cvar", 0.1) == pytest.approx(1.75498, abs=1e-4)


def _price(rewards, staleness=None, **kw):
    args = dict(value=1.0, n0=4.0, kappa_update=1e-3, drift=0.05, drift_scale=0.1, risk_aversion=1.0, risk_k=1.0)
    args.update(kw)
    n = len(rewards)
    return price_arrays(np.array(rewards, float), np.zeros(n, np.int64), np.full(n, 10.0),
                        np.zeros(n) if staleness is None else np.array(staleness, float), **args)


def test_trajectory_price_by_hand():
    # group [1, 0, 0, 0], n = 4, n0 = 4: r̄ = 0.25, σ̂² = 0.1875, G = 4·0.1875·4/8 = 0.375
    # A = [0.75, −0.25×3]/0.43301 = [1.7321, −0.5774×3], Σ|A| = 3.4641 → shares [0.5, 1/6×3]
    # g⁰ = [0.1875, 0.0625×3];  relative error min(1, 1/(√4·|A|)) = [0.28868, 0.86603]
    # risk_variance (ρ = 1) = [0.1875·0.28868, 0.0625·0.86603] = [0.054127, 0.054127]
    # cost = 1e-3 · 10 = 0.01;  price = [0.1875 − 0.01 − 0.054127, 0.0625 − 0.01 − 0.054127] = [0.123373, −0.001627]
    out = _price([1, 0, 0, 0])
    assert out.advantage == pytest.approx([1.7320508, -0.5773503, -0.5773503, -0.5773503], rel=1e-5)
    assert out.gain == pytest.approx([0.1875, 0.0625, 0.0625, 0.0625])
    assert out.risk_variance == pytest.approx([0.0541266] * 4, rel=1e-5)
    assert out.cost == pytest.approx([0.01] * 4)
    assert out.price == pytest.approx([0.1233734, -0.0016266, -0.0016266, -0.0016266], rel=1e-4)
    assert not out.zero_var.any()


def test_trajectory_price_stale():
    # same group, the success 2 versions stale: D = e^-1 = 0.367879
    # gain = 0.1875·0.367879 = 0.068977;  risk_staleness = 0.1875·(1 − 0.367879) = 0.118523
    # price = 0.0689774 − 0.01 − 0.0541266 − 0.1185226 = −0.1136718
    out = _price([1, 0, 0, 0], staleness=[2, 0, 0, 0])
    assert out.depreciation[0] == pytest.approx(math.exp(-1))
    assert out.gain[0] == pytest.approx(0.068977, abs=1e-6)
    assert out.risk_staleness[0] == pytest.approx(0.118523, abs=1e-6)
    assert out.price[0] == pytest.approx(-0.1136718, abs=1e-6)
    assert out.risk_staleness[1] == 0.0


def test_zero_variance_group_has_no_gain():
    out = _price([1, 1, 1])
    assert out.zero_var.all()
    assert out.gain == pytest.approx([0, 0, 0]) and out.risk == pytest.approx([0, 0, 0])
    assert out.price == pytest.approx([-0.01] * 3)  # only the update cost is left


def test_consistent_admission_drops_subsets_without_signal():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    group = np.array([0, 0, 0, 1, 1, 2, 2])
    admit = np.array([True, False, False, True, True, True, True])
    # group 0: only the success admitted (1 member) → dropped; group 1: [1, 0] kept; group 2: [1, 1] equal → dropped
    assert consistent_admission(admit, rewards, group).tolist() == [False, False, False, True, True, False, False]


def max_variance_subset(rewards: np.ndarray, m: int) -> np.ndarray:
    """Reference, one group at a time (the definition max_variance_keep vectorises): indices of the size-m subset
    with the largest reward variance (PODS, arXiv 2504.13818: it is always the top k and bottom m − k rewards for some
    k, so m + 1 candidates are checked). Ties keep the most balanced split."""
    n = len(rewards)
    if m >= n:
        return np.arange(n)
    order = np.argsort(rewards, kind="stable")
    best_k, best_var = 0, -1.0
    for k in sorted(range(m + 1), key=lambda k: abs(2 * k - m)):
        pick = np.concatenate([order[n - k:], order[: m - k]])
        v = float(np.var(rewards[pick]))
        if v > best_var + 1e-12:
            best_k, best_var = k, v
    return np.sort(np.concatenate([order[n - best_k:], order[: m - best_k]]))


def test_max_variance_subset():
    # [0, 0, 1, 0.5], m = 2: best is one top and one bottom reward, {1, 0}, variance 0.25
    assert max_variance_subset(np.array([0.0, 0.0, 1.0, 0.5]), 2).tolist() == [0, 2]
    # m = 3 of [0.1, 0.9, 0.5, 0.3]: k=1 {0.9, 0.1, 0.3} var 0.1156; k=2 {0.9, 0.5, 0.1} var 0.1067 → k=1
    assert max_variance_subset(np.array([0.1, 0.9, 0.5, 0.3]), 3).tolist() == [0, 1, 3]
    assert max_variance_subset(np.array([0.2, 0.4]), 3).tolist() == [0, 1]
    # the same through the vectorised version, one group each
    for rewards, m, expected in (([0.0, 0.0, 1.0, 0.5], 2, [0, 2]), ([0.1, 0.9, 0.5, 0.3], 3, [0, 1, 3]),
                                 ([0.2, 0.4], 3, [0, 1])):
        mask = max_variance_keep(np.array(rewards), np.zeros(len(rewards), dtype=np.int64), np.array([m]))
        assert np.flatnonzero(mask).tolist() == expected


def _tables():
    # two prompts, T(n) = 10n tokens, no cost; gains G(n), n = 0..4
    gain = np.array([[0, 0, 1.0, 1.3, 1.45], [0, 0, 0.8, 1.0, 1.1]])
    return gain, np.zeros_like(gain), np.tile(10.0 * np.arange(5), (2, 1))


def test_max_variance_keep_equals_the_subsets_group_by_group():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(1, 10, rng.integers(1, 8))
        group = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))  # members interleaved, dense ids
        rewards = rng.choice([0.0, 0.25, 0.5, 1.0], len(group)) if rng.random() < 0.5 else rng.random(len(group))
        keep = np.array([rng.integers(1, n + 1) for n in sizes])
        expected = np.zeros(len(group), dtype=bool)
        for g, m in enumerate(keep):
            members = np.flatnonzero(group == g)
            expected[members[max_variance_subset(rewards[members], int(m))]] = True
        assert max_variance_keep(rewards, group, keep).tolist() == expected.tolist()


def test_greedy_spends_sample_budget_exactly():
    # entry blocks (price per token): A: 1/20 = .05, 1.3/30 = .043, 1.45/40 = .036 → n=2; B: .8/20 = .04 → n=2
    # pops: A→2 (.05, left 5), B→2 (.04, left 3), A→3 (.3/10 = .03, left 2), B→3 (.02, left 1), A→4 (.015, left 0),
    # B→4 (.01) does not fit. 4 + 3 = 7 samples = the budget.
    gain, cost, tokens = _tables()
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_samples=7).tolist() == [4, 3]
    # budget 5: A→2, B→2, A→3 → 3 + 2 = 5
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_samples=5).tolist() == [3, 2]
    # budget 3: A→2 (left 1); B's block of 2 does not fit (no smaller block exists), A→3 does → [3, 0], 3 spent
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_samples=3).tolist() == [3, 0]


def test_greedy_token_budget_and_refit():
    gain, cost, tokens = _tables()
    # 45 tokens: A→2 (20, left 25), B→2 (20, left 5), nothing else fits (10 each) → 40 tokens
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_tokens=45).tolist() == [2, 2]
    # entries .2/20 = .01, 1.5/30 = .05, 1.6/40 = .04 → best block 3 (30 tokens) does not fit 25; re-enter with 2
    gain2 = np.array([[0, 0, 0.2, 1.5, 1.6]])
    assert allocate_greedy(gain2, np.zeros_like(gain2), tokens[:1], 2, 4, max_tokens=25).tolist() == [2]


def test_greedy_sample_cap_binds_before_the_token_budget():
    gain, cost, tokens = _tables()
    # pops as above: A→2 (left 3 samples, 80 tokens), B→2 (1, 60), A→3 (0, 50): the 5 samples are spent, 50 of the
    # 100 tokens are not
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_samples=5, max_tokens=100).tolist() == [3, 2]
    # re-entry under both limits: gain2's best block (3, 30 tokens) does not fit 25 tokens; of the blocks within 3
    # samples and 25 tokens only n=2 fits (20 tokens) → [2]; with 1 sample left no block fits at all → [0]
    gain2 = np.array([[0, 0, 0.2, 1.5, 1.6]])
    assert allocate_greedy(gain2, np.zeros_like(gain2), tokens[:1], 2, 4, max_samples=3, max_tokens=25).tolist() == [2]
    assert allocate_greedy(gain2, np.zeros_like(gain2), tokens[:1], 2, 4, max_samples=1, max_tokens=25).tolist() == [0]


def test_greedy_token_budget_binds_before_the_sample_cap():
    gain, cost, tokens = _tables()
    # 45 tokens, 7 samples: A→2 (left 25 tokens, 5 samples), B→2 (5, 3), A→3 needs 10 tokens > 5: dropped, and so
    # is every other increment → 4 samples of the 7, 40 of the 45 tokens
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_samples=7, max_tokens=45).tolist() == [2, 2]
    # no limit at all: every sample whose price is positive, up to max_n
    assert allocate_greedy(gain, cost, tokens, 2, 4).tolist() == [4, 4]


def _allocate_reference(gain, cost, tokens, min_n, max_n, max_samples=math.inf, max_tokens=math.inf):
    """The greedy allocation written plainly (numpy scalars, every option pushed, stop at the first non-positive
    price): what allocate_greedy must reproduce exactly."""
    alloc = np.zeros(gain.shape[0], dtype=np.int64)
    if gain.shape[0] == 0 or max_n < min_n or min_n < 1:
        return alloc
    sizes = np.arange(min_n, max_n + 1)
    block_ppt = (gain[:, sizes] - cost[:, sizes]) / np.maximum(tokens[:, sizes], 1e-12)
    heap = []
    for c in range(gain.shape[0]):
        k = int(np.argmax(block_ppt[c]))
        heap.append((-float(block_ppt[c, k]), c, int(sizes[k])))
    heapq.heapify(heap)
    left = [float(max_samples), float(max_tokens)]
    while heap:
        neg_ppt, c, to = heapq.heappop(heap)
        if -neg_ppt <= 0:
            break
        frm = int(alloc[c])
        need = [float(to - frm), float(tokens[c, to] - tokens[c, frm])]
        if need[0] > left[0] + 1e-9 or need[1] > left[1] + 1e-9:
            if frm == 0:
                fits = (sizes <= left[0] + 1e-9) & (tokens[c, sizes] - tokens[c, 0] <= left[1] + 1e-9)
                if fits.any():
                    k = int(np.argmax(np.where(fits, block_ppt[c], -np.inf)))
                    heapq.heappush(heap, (-float(block_ppt[c, k]), c, int(sizes[k])))
            continue
        left = [left[0] - need[0], left[1] - need[1]]
        alloc[c] = to
        if to < max_n:
            d_tok = max(float(tokens[c, to + 1] - tokens[c, to]), 1e-12)
            heapq.heappush(heap, (-float((gain[c, to + 1] - gain[c, to] - cost[c, to + 1] + cost[c, to]) / d_tok), c,
                                  to + 1))
    return alloc


NUMBA = pytest.mark.skipif(kernels.greedy() is None, reason="needs numba (the `fast` extra, in `dev`)")
BOTH = pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=NUMBA)], ids=["python", "numba"])


@BOTH
def test_greedy_equals_the_reference_on_random_tables(compiled):
    rng = np.random.default_rng(0)
    for trial in range(600):
        # up to 60 prompts: most are left over when the limits run out, and dropped (or the loop stops early)
        num, min_n = int(rng.integers(0, 12 if trial < 400 else 60)), int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 8))
        ns = np.arange(max_n + 1)
        p = rng.random((num, 1))
        tokens = np.cumsum(np.concatenate([np.zeros((num, 1)), rng.uniform(5, 30, (num, max_n))], axis=1), axis=1)
        if trial % 3 == 2:  # tables no planner makes: T(0) > 0, and T that falls with n
            tokens = rng.uniform(0, 200, (num, max_n + 1))
        if trial % 2:  # the planner's shape: concave gains, costs per token
            gain = expected_group_gain(p, ns, 1.0, 8.0)
            cost = rng.uniform(0, 3e-3) * tokens
        else:  # anything, with ties: prices need not fall with n
            gain = np.round(rng.uniform(-0.2, 1.0, (num, max_n + 1)), 1)
            cost = np.round(rng.uniform(0, 0.2, (num, max_n + 1)), 1)
        limits = [dict(), dict(max_samples=int(rng.integers(0, 40))), dict(max_tokens=float(rng.uniform(0, 600))),
                  dict(max_samples=int(rng.integers(0, 40)), max_tokens=float(rng.uniform(0, 600)))]
        for kw in limits:
            expected = _allocate_reference(gain, cost, tokens, min_n, max_n, **kw)
            got = allocate_greedy(gain, cost, tokens, min_n, max_n, compiled=compiled, **kw)
            assert got.tolist() == expected.tolist(), (trial, kw)


@BOTH
def test_an_entry_block_is_fitted_on_what_it_adds_to_t0(compiled):
    # T(0) = −100: the block of 2 adds 20 − (−100) = 120 tokens, more than the 50 left. It used to be re-entered on its
    # own T(2) = 20 (which fits) and checked on the 120 (which does not), for ever; now it is dropped
    gain, tokens = np.array([[0.0, 0.0, 1.0, 1.5]]), np.array([[-100.0, 10.0, 20.0, 30.0]])
    assert allocate_greedy(gain, 0 * gain, tokens, 2, 3, max_tokens=50.0, compiled=compiled).tolist() == [0]
    assert allocate_greedy(gain, 0 * gain, tokens, 2, 3, max_tokens=125.0, compiled=compiled).tolist() == [2]


@NUMBA
def test_the_compiled_greedy_is_the_python_one_on_any_table():
    # NaNs and infinities in the tables (no planner makes them, and the reference's heap breaks on them): the kernel
    # must still agree with the Python loop it replaces, sample for sample
    rng = np.random.default_rng(1)
    for trial in range(300):
        num, min_n = int(rng.integers(1, 30)), int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 8))
        gain, cost = rng.uniform(-0.2, 1.0, (num, max_n + 1)), rng.uniform(0, 0.2, (num, max_n + 1))
        tokens = np.cumsum(rng.uniform(0, 30, (num, max_n + 1)), axis=1)
        for table in (gain, cost, tokens):
            table[rng.random(table.shape) < 0.05] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
        for kw in (dict(), dict(max_samples=int(rng.integers(0, 40))), dict(max_tokens=float(rng.uniform(0, 400))),
                   dict(max_samples=int(rng.integers(0, 40)), max_tokens=float(rng.uniform(0, 400)))):
            with np.errstate(invalid="ignore", divide="ignore"):  # inf − inf, 0/0: NaN, as the kernel gets them
                python = allocate_greedy(gain, cost, tokens, min_n, max_n, compiled=False, **kw)
            compiled = allocate_greedy(gain, cost, tokens, min_n, max_n, compiled=True, **kw)
            assert compiled.tolist() == python.tolist(), (trial, kw)


def _same_bits(compiled, plain) -> None:
    for a, b in zip(compiled, plain, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@NUMBA
def test_the_compiled_posterior_tables_are_the_numpy_ones_bit_for_bit():
    rng = np.random.default_rng(2)
    n = np.arange(17)[None, :]
    kw = dict(value=1.5, n0=4.0, kappa_rollout=1e-3, kappa_verify=2e-3, kappa_update=3e-3, kappa_scale=0.7)
    alpha, beta = rng.uniform(0.05, 60, 200), rng.uniform(0.05, 60, 200)
    alpha[:3], beta[:3] = [1.0, 1e-9, 1e6], [1.0, 1e6, 1e-9]  # the flat prior and two all-but-certain posteriors
    lengths = rng.uniform(5, 40, 200), rng.uniform(0, 5, 200), rng.uniform(5, 40, 200)
    compiled = kernels.posterior_tables()(alpha, beta, *lengths, 17, *kw.values())
    _same_bits(compiled, group_economics(None, n, *(x[:, None] for x in lengths), posterior=(alpha, beta), **kw))


def _groups(rng, sizes) -> np.ndarray:
    """Dense group ids for groups of these sizes, their members interleaved (as a gathered step may have them)."""
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


@NUMBA
def test_the_compiled_prices_and_fates_are_the_numpy_ones_bit_for_bit(monkeypatch):
    from marginal_rl.budget.policies import base, marginal

    rng = np.random.default_rng(3)
    cfg, seen = marginal.MarginalConfig(risk_aversion=0.5), set()
    for trial in range(200):
        group = _groups(rng, rng.integers(1, 9, int(rng.integers(0, 20))))
        num = len(group)
        rewards = [(rng.random(num) < rng.random()).astype(float), np.round(rng.random(num), 1), rng.random(num)][trial % 3]
        staleness = rng.integers(0, 4, num) * (trial % 3 == 0)  # fresh (D = 1 exactly) two trials in three
        if trial % 7 == 6 and num:
            rewards[rng.integers(num)] = np.nan  # a reward no reward function should give: the same NaNs
        arrays = base.TrajectoryArrays(rewards, group, rng.integers(5, 60, num) * 1.0, staleness)
        kw = dict(value=1.5, n0=8.0, kappa_update=float(rng.uniform(0, 0.02)), drift=float(rng.uniform(0, 0.5)),
                  drift_scale=1.0, risk_aversion=float(rng.uniform(0, 2)), risk_k=1.3)
        with np.errstate(invalid="ignore"):
            compiled = price_arrays(*arrays, **kw)
            fates = marginal.fates_marginal(cfg, arrays, compiled)
            with monkeypatch.context() as m:
                m.setattr(kernels, "prices", lambda: None)
                m.setattr(kernels, "marginal_fates", lambda: None)
                plain = price_arrays(*arrays, **kw)
                plain_fates = marginal.fates_marginal(cfg, arrays, plain)
        for name, a, b in zip(plain._fields, compiled, plain, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (trial, name)
            if not np.isnan(rewards).any():
                assert a.tobytes() == b.tobytes(), (trial, name)
        assert fates.dtype == plain_fates.dtype and fates.tolist() == plain_fates.tolist(), trial
        seen.update(fates.tolist())
    assert seen == set(range(len(FATES)))  # every fate came up


@NUMBA
def test_the_compiled_pilot_tables_are_the_numpy_ones_bit_for_bit(monkeypatch):
    from marginal_rl.budget.pricing import pilot_group_economics

    rng = np.random.default_rng(4)
    num = 300
    k = rng.integers(1, 5, num).astype(float)
    s = np.where(rng.random(num) < 0.5, np.round(rng.random(num) * k), rng.choice([0.0, 1.0], num) * k)
    alpha, beta = rng.uniform(0.05, 40, num) + s, rng.uniform(0.05, 40, num) + k - s
    alpha[:2], beta[:2] = [1e-9, 1e6], [1e6, 1e-9]  # all-but-certain posteriors
    flat = (s == 0) | (s == k)
    lengths = rng.uniform(5, 40, num), rng.uniform(0, 5, num), rng.uniform(5, 40, num)
    kw = dict(value=1.5, n0=4.0, kappa_rollout=1e-3, kappa_verify=2e-3, kappa_update=3e-3, kappa_scale=0.7)
    for width in (1, 2, 16):
        compiled = pilot_group_economics(alpha, beta, k, s, flat, width, *lengths, **kw)
        with monkeypatch.context() as m:
            m.setattr(kernels, "pilot_tables", lambda: None)
            _same_bits(compiled, pilot_group_economics(alpha, beta, k, s, flat, width, *lengths, **kw))


def test_greedy_stops_when_no_price_is_positive():
    gain, _, tokens = _tables()
    cost = 0.045 * tokens  # κ = .045/token: A's entry .05 − .045 > 0, A→3 .03 − .045 < 0, B .04 − .045 < 0
    assert allocate_greedy(gain, cost, tokens, 2, 4, max_samples=100).tolist() == [2, 0]
    assert allocate_greedy(gain, 1.0 * tokens, tokens, 2, 4, max_samples=100).tolist() == [0, 0]


def test_controller_step():
    # 1.0·exp(0.5·(1500/1000 − 1)) = e^0.25 = 1.284025; under budget: 2·exp(0.5·(500/1000 − 1)) = 2·e^-0.25 = 1.557602
    assert controller_step(1.0, 1500, 1000, 0.5, 1e-3, 1e3) == pytest.approx(1.284025)
    assert controller_step(2.0, 500, 1000, 0.5, 1e-3, 1e3) == pytest.approx(1.557602)
    assert controller_step(1.0, 1000, 1000, 0.5, 1e-3, 1e3) == 1.0  # on budget: fixed point
    assert controller_step(1.0, 1e9, 1000, 0.5, 1e-3, 10.0) == 10.0  # clipped


def test_family_strength_by_hand():
    # guess 4: ρ₀ = 1/5, worth 56 pairs. No evidence: the guess. 10 groups of 4 from prompts solved (5) or not (5):
    # S = F = 20, Q = 5·12 = 60 of M = 120 pairs, Q/M = 0.5 = μ² + σ², ρ̂ = 0.25/0.25 = 1; ρ = (120 + 11.2)/176, k =
    # 1/ρ − 1 = 0.3415 -> 0.5 (the floor). Prompts all at the family's rate (ρ̂ = 0; μ = 0 or 1 is no spread too):
    # ρ = 11.2/176, k = 14.714. Prompts at 0.25 and 0.75 (μ = 0.5, E[p²] = 0.3125, ρ̂ = 0.0625/0.25 = 0.25), 1000
    # pairs: ρ = (250 + 11.2)/1056 = 0.247348, k = 3.042879. Pairs that agree less than the mean's square (ρ̂ < 0:
    # Q/M = 0.2) count as no spread, and at 1000 pairs k = 1056/11.2 − 1 = 93.3 is capped at 64
    assert family_strength(0.0, 0.0, 0.0, 0.0, 4.0) == pytest.approx(4.0)
    assert family_strength(20.0, 20.0, 60.0, 120.0, 4.0) == 0.5
    k = family_strength(np.array([0.0, 40.0, 20.0, 50.0, 50.0]), np.array([40.0, 0.0, 20.0, 50.0, 50.0]),
                        np.array([0.0, 120.0, 30.0, 312.5, 200.0]), np.array([120.0, 120.0, 120.0, 1000.0, 1000.0]),
                        4.0)
    assert k == pytest.approx([176 / 11.2 - 1, 176 / 11.2 - 1, 176 / 11.2 - 1, 1056 / 261.2 - 1, 64.0])


@NUMBA
def test_the_compiled_pooled_prior_is_the_numpy_one_bit_for_bit(monkeypatch):
    from marginal_rl.budget.policies import base, budget_config
    from marginal_rl.budget.state import BudgetState

    rng = np.random.default_rng(5)
    books = [{f"f{i}": [float(rng.uniform(0, 60)), float(rng.uniform(0, 60)), int(rng.integers(0, 3))] for i in names}
             for names in ((0, 1, 2, 3, 4), (0, 2, 5, 6))]
    # f5, f6: families with probes only, f7: without evidence; every fifth prompt has no family
    # pool_dispersion's pairs: a family's passing pairs Q <= its pairs M (f0-f4, as the groups' books)
    pairs = {f: [float(rng.uniform(0, 1)) * 200.0, 200.0, v] for f, (_, _, v) in books[0].items()}
    state = BudgetState(families=books[0], family_probes=books[1], family_pairs=pairs, version=3,
                        family_of={f"p{i}": f"f{i % 8}" if i % 5 else "" for i in range(200)})
    rows = base.family_rows(state, [f"p{i}" for i in range(200)])
    own = base.PromptArrays(rng.uniform(1, 8, 200), rng.uniform(1, 8, 200), *np.zeros((6, 200)))
    for pool_probes, dispersion in ((False, False), (True, False), (False, True), (True, True)):
        cfg = budget_config("marginal", pool_strength=4.0, probe_strength=16.0, pool_probes=pool_probes,
                            pool_dispersion=dispersion, drift_prior=0.01)
        compiled = base.pool_prior(cfg, state, own, rows, 4.0)
        with monkeypatch.context() as m:
            m.setattr(kernels, "pool_prior", lambda: None)
            _same_bits(compiled, base.pool_prior(cfg, state, own, rows, 4.0))
        assert not np.array_equal(compiled.alpha, own.alpha)  # (the families moved the priors)


_ONE_TYPE_RUN = '''
import numpy as np
from marginal_rl.budget import kernels
from marginal_rl.budget.allocator import Budget, Update
from marginal_rl.budget.policies import SampleLimits, budget_config
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns

keys = dict(token_budget=2400, pool_strength=4.0, pool_dispersion=True, pace="run", reuse_buffer=256,
            discover_price=True, probe_strength=16.0, probe_refresh="every", pool_probes=True, posterior="expected",
            family_half_samples=256.0, prompt_half_samples=8.0, pilot_samples=2)
rng = np.random.default_rng(0)
rates = rng.random(300)
budget = Budget(budget_config("marginal", **keys), SampleLimits(32, 8, 2, 16), families={f"p{i}": f"f{i % 5}" for i in range(300)})
warmed = {name: len(kernels._compiled()[name].signatures) for name in kernels._compiled()}

def sample(step, plan, counts, tag):
    return [Trajectory(f"t{tag}{step}-{pid}-{k}", pid, f"g{step}-{pid}", step, step, [0] * 10, [0] * 4, [1] * 4,
                       [0.0] * 4, float(rng.random() < rates[int(pid[1:])]), "eos")
            for pid, n in zip(plan.prompt_ids, counts.tolist()) for k in range(n)]

for step in range(8):
    ids = [f"p{i}" for i in rng.choice(300, size=budget.candidates_per_step, replace=False)]
    plan = budget.plan(ids, step, rng, lambda ps: ([float(rates[int(p[1:])]) for p in ps], [14] * len(ps)))
    pilots = sample(step, plan, np.minimum(plan.samples, 2), "p")
    grown = budget.top_up(plan, TrajectoryColumns.of(pilots), rng)
    trajectories = pilots + sample(step, grown, grown.samples - np.minimum(plan.samples, 2), "u")
    budget.settle(grown, TrajectoryColumns.of(trajectories), step, step,
                  lambda prices, reuse: Update(step + 1, 0.01, 0.02), trajectories)
    budget.ledger_metrics()
print({name: (warmed[name], len(kernels._compiled()[name].signatures)) for name in warmed})
'''


@NUMBA
def test_a_run_uses_the_kernels_warm_compiled_and_no_other():
    # a kernel called with another argument type (a read-only or strided array, an int64 for a float) compiles a second
    # copy, ~0.5-2 s in the middle of a step: every mechanism on, each kernel keeps the one signature warm() gave it
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ONE_TYPE_RUN], capture_output=True, text=True, check=True)
    counts = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert set(counts) == {"greedy", "posterior_tables", "pilot_tables", "prices", "marginal_fates", "pool_prior"}
    assert all(counts[name] == (1, 1) for name in counts), counts
