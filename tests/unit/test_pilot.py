"""Pilot then commit (`budget.pilot_samples`, docs/budget.md "Pilot then commit"), checked by hand: the price of
growing a group given what its first samples showed (against enumeration, and averaged over the pilot's outcomes it
is the unpiloted price), the top-up's allocation and record on a two-prompt case worked out below, how the trainer
joins the two draws into one group, and the config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from marginal_rl.budget.allocator import Budget
from marginal_rl.budget.policies import SampleLimits, budget_config
from marginal_rl.budget.policies.base import make_plan
from marginal_rl.budget.policies.marginal import plan_top_up
from marginal_rl.budget.pricing import (
    expected_group_gain,
    informative_prob,
    pilot_group_economics,
    posterior_informative_prob,
    posterior_spread,
)
from marginal_rl.budget.state import BudgetState
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns
from marginal_rl.train.config import ConfigError, load_config
from marginal_rl.train.loop import join_groups

N0 = 8.0


def _beta_binomial(x: int, m: int, a: float, b: float) -> float:
    log_beta = lambda u, v: math.lgamma(u) + math.lgamma(v) - math.lgamma(u + v)  # noqa: E731
    return math.comb(m, x) * math.exp(log_beta(x + a, m - x + b) - log_beta(a, b))


def _economics(alpha, beta, k, s, flat, m_max, exact, lengths=(10.0, 0.0, 10.0), kappa=(1e-3, 1e-3, 1e-3)):
    one = np.ones(1)
    return pilot_group_economics(alpha * one, beta * one, k * one, s * one, np.array([flat]),
                                 m_max + 1, *(x * one for x in lengths), value=1.0, n0=N0,
                                 kappa_rollout=kappa[0], kappa_verify=kappa[1], kappa_update=kappa[2], exact=exact)


def test_a_pilot_at_an_exact_pass_rate_by_hand():
    # p = 0.5, the pilot 2 of 2. m = 1: a fail (1/2) makes r̄ = 2/3, 4r̄(1 − r̄) = 8/9, × 3/(3 + 8); P_inf = 1/2.
    # m = 2: X ~ Bin(2, 0.5), r̄ = (2 + X)/4: E[4r̄(1 − r̄)] = 1/4·1 + 1/2·0.75 + 1/4·0 = 0.625, × 4/(4 + 8);
    # P_inf = 1 − 0.5² = 0.75; tokens: 2 samples × 10 + (0.75 × 4 − 0 × 2) × 10 update = 50
    informative, gain, cost, tokens = _economics(0.5, 0.5, 2, 2, True, 2, exact=True)
    assert np.allclose(gain[0], [0.0, 0.5 * 8 / 9 * 3 / 11, 0.625 * 4 / 12])
    assert np.allclose(informative[0], [0.0, 0.5, 0.75])
    assert np.allclose(tokens[0], [0.0, 10 + 0.5 * 3 * 10, 50.0])
    assert np.allclose(cost[0], tokens[0] * 1e-3)  # every κ is 1e-3
    # a mixed pilot (1 of 2) already carries its signal: P_inf = 1, its own gain 4·0.25·2/10 = 0.2 at m = 0, and
    # each more sample costs its rollout and its update
    informative, gain, _, tokens = _economics(0.5, 0.5, 2, 1, False, 1, exact=True)
    assert np.allclose(informative[0], [1.0, 1.0]) and math.isclose(gain[0, 0], 0.2)
    assert np.allclose(tokens[0], [0.0, 20.0])


def test_a_pilot_under_a_posterior_agrees_with_enumeration():
    # p ~ Beta(2, 3) after an all-fail pilot of 3: X ~ BetaBinomial(m, 2, 3)
    a, b, k = 2.0, 3.0, 3
    informative, gain, _, _ = _economics(a, b, k, 0, True, 4, exact=False)
    for m in range(5):
        n = k + m
        pmf = [_beta_binomial(x, m, a, b) for x in range(m + 1)]
        assert math.isclose(sum(pmf), 1.0, rel_tol=1e-9)
        want = sum(q * 4 * (x / n) * (1 - x / n) * n / (n + N0) for x, q in enumerate(pmf))
        assert math.isclose(gain[0, m], want, rel_tol=1e-9, abs_tol=1e-12), m
        assert math.isclose(informative[0, m], 1 - pmf[0], rel_tol=1e-9, abs_tol=1e-12), m


@pytest.mark.parametrize("exact", [True, False])
def test_averaged_over_the_pilot_the_price_is_the_unpiloted_one(exact):
    # the law of total expectation: E over the pilot's s of G(k + m | s) is G(k + m), and likewise P_inf; at an exact
    # p the pilot's s ~ Bin(k, p), under Beta(a, b) s ~ BetaBinomial(k, a, b) and the posterior after it Beta(a + s,
    # b + k − s)
    a, b, k = 1.5, 2.5, 3
    p = a / (a + b)
    m = np.arange(6)
    avg_gain, avg_inf = np.zeros(len(m)), np.zeros(len(m))
    for s in range(k + 1):
        if exact:
            q, post = math.comb(k, s) * p**s * (1 - p) ** (k - s), (p, 1 - p)
        else:
            q, post = _beta_binomial(s, k, a, b), (a + s, b + k - s)
        informative, gain, _, _ = _economics(*post, k, s, s in (0, k), len(m) - 1, exact=exact)
        avg_gain, avg_inf = avg_gain + q * gain[0], avg_inf + q * informative[0]
    n = k + m
    if exact:
        want_gain, want_inf = expected_group_gain(p, n, 1.0, N0), informative_prob(p, n)
    else:
        want_gain = posterior_spread(np.array([a]), np.array([b]))[0] * (n - 1) / (n + N0)
        want_inf = posterior_informative_prob(np.array([a]), np.array([b]), n[None, :])[0]
    assert np.allclose(avg_gain, want_gain, rtol=1e-9) and np.allclose(avg_inf, want_inf, rtol=1e-9)


def _two_pilots(kappa: float, prompts_per_step: int = 1, group_size: int = 5):
    """Two unseen prompts (Beta(1, 1), 10 tokens per sample for rollout and update), piloted with 2 samples each:
    A passed 1 of 2 (posterior Beta(2, 2): p = 0.5), B passed 2 of 2 (Beta(3, 1): p = 0.75)."""
    cfg = budget_config("marginal", posterior="mean", prior_tokens=10, kappa_rollout=kappa, kappa_verify=kappa,
                        kappa_update=kappa, pilot_samples=2)
    limits = SampleLimits(prompts_per_step, group_size, 2, 16)
    zeros = np.zeros(2)
    plan = make_plan(["A", "B"], np.array([4, 4]), zeros + 0.5, zeros + 0.5, zeros, zeros, zeros, zeros, zeros)
    return plan_top_up(cfg, BudgetState(), plan, np.array([2, 2]), np.array([1.0, 2.0]), np.array([False, True]),
                       np.random.default_rng(0), limits, committed=40.0)


def test_the_top_up_grows_the_group_whose_next_sample_is_worth_more_per_token():
    # one sample left (1 × 5 a step, the pilots drew 4). Its price per token at κ = 1e-3:
    #   A (p = 0.5, mixed): G(3) − G(2) = (8/9)·3/11 − 0.2 = 0.042424 for 10 rollout + 10 update tokens:
    #       (0.042424 − 0.020)/20 = 0.00112
    #   B (p = 0.75, flat): G(3) = 0.25·(8/9)·3/11 = 0.060606 for 10 rollout + 0.25·3·10 update tokens:
    #       (0.060606 − 0.0175)/17.5 = 0.00246
    # so B's, although A's pilot has the signal: a flat pilot's third sample may give the whole group one
    plan = _two_pilots(1e-3)
    assert plan.samples.tolist() == [2, 3] and plan.pilot.tolist() == [2, 2]
    # each group priced whole: A its pilot (gain 0.2, 20 rollout + 20 update tokens), B grown to 3
    assert np.allclose(plan.gain, [0.2, 0.060606], atol=1e-6)
    assert np.allclose(plan.tokens, [40.0, 20.0 + 17.5])
    assert np.allclose(plan.cost, [0.040, 0.0375])
    assert np.allclose(plan.informative, [1.0, 0.25])
    # at 100× the price neither grows: the pilots are what the step samples
    assert _two_pilots(0.1).samples.tolist() == [2, 2]
    # with room (2 × 8 a step: 12 samples left) and the price at 1e-3 both grow, each to where its next sample's price
    # per token stops being positive, within max_group_size
    roomy = _two_pilots(1e-3, prompts_per_step=2, group_size=8)
    assert (roomy.samples > roomy.pilot).all() and roomy.samples.sum() <= 16


def test_budget_top_up_reads_the_pilots_from_their_trajectories():
    cfg = budget_config("marginal", posterior="mean", prior_tokens=10, pilot_samples=2)
    budget = Budget(cfg, SampleLimits(1, 5, 2, 16))
    zeros = np.zeros(2)
    plan = make_plan(["A", "B"], np.array([4, 4]), zeros + 0.5, zeros + 0.5, zeros, zeros, zeros, zeros, zeros)
    pilots = [_traj(f"t{i}", pid, f"g{pid}", r) for i, (pid, r) in enumerate([("A", 1), ("B", 1), ("A", 0), ("B", 1)])]
    by_hand = plan_top_up(cfg, budget.state, plan, np.array([2, 2]), np.array([1.0, 2.0]), np.array([False, True]),
                          np.random.default_rng(0), budget.limits,
                          committed=float(TrajectoryColumns.of(pilots).tokens_rollout.sum()))
    got = budget.top_up(plan, TrajectoryColumns.of(pilots), np.random.default_rng(0))
    assert got.samples.tolist() == by_hand.samples.tolist() and np.allclose(got.tokens, by_hand.tokens)


def _traj(traj_id: str, prompt_id: str, group_id: str, reward: float) -> Trajectory:
    return Trajectory(traj_id=traj_id, prompt_id=prompt_id, group_id=group_id, step=0, behavior_version=0,
                      prompt_ids=[1] * 6, completion_ids=[2] * 4, completion_mask=[1] * 4,
                      behavior_logprobs=[-1.0] * 4, reward=reward, finish_reason="stop")


def test_the_samples_drawn_after_the_pilot_join_its_group():
    pilots = [_traj("r0-s0-0", "A", "r0-s0-g0", 1), _traj("r1-s0-0", "B", "r1-s0-g0", 0),
              _traj("r0-s0-1", "A", "r0-s0-g0", 0), _traj("r1-s0-1", "B", "r1-s0-g0", 0)]
    rest = [_traj("r0-us0-0", "B", "r0-us0-g0", 1), _traj("r1-us0-0", "A", "r1-us0-g0", 1)]
    joined = join_groups(pilots, rest)
    assert [t.traj_id for t in joined] == ["r0-s0-0", "r0-s0-1", "r1-us0-0", "r1-s0-0", "r1-s0-1", "r0-us0-0"]
    assert [t.group_id for t in joined] == ["r0-s0-g0"] * 3 + ["r1-s0-g0"] * 3
    cols = TrajectoryColumns.of(joined)
    assert cols.group_size.tolist() == [3, 3] and cols.group_flat.tolist() == [False, False]


@pytest.mark.parametrize("overrides,match", [
    (["budget.policy=marginal", "budget.pilot_samples=2", "rollout.async_rollout=true"], "rollout.async_rollout"),
    (["budget.policy=marginal", "budget.pilot_samples=16"], "rollout.max_group_size=16"),
    (["budget.policy=marginal", "budget.pilot_samples=-1"], "pilot_samples: expected an integer >= 0"),
    (["budget.policy=none", "budget.pilot_samples=2"], "budget.policy=marginal"),
])
def test_pilot_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], overrides)
