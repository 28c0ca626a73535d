"""Policies, state and controller: hand-computed updates, invariants (hypothesis) and edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marginal_rl.budget import policies
from marginal_rl.budget.metrics import COMPONENTS, price_histograms, step_metrics
from marginal_rl.budget.policies import POLICIES, SampleLimits, plan_prompts
from marginal_rl.budget.policies import budget_config as BudgetConfig
from marginal_rl.budget.policies.marginal import clearing_scale, planner_limits
from marginal_rl.budget.records import PromptPlan, TrajectoryPrices
from marginal_rl.budget.state import BudgetState, PromptStats, fold_probe
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns

LIMITS = SampleLimits(prompts_per_step=4, group_size=8, min_group_size=2, max_group_size=16)


# The budget reads columns; the tests write their steps as records, which read more easily.
def price_trajectories(cfg, state, trajs, current_version, **kw) -> TrajectoryPrices:
    return policies.price_trajectories(cfg, state, TrajectoryColumns.of(trajs), current_version, **kw)


def update_state(cfg, state, trajs, step, current_version, drift_kl=None, **kw) -> None:
    policies.update_state(cfg, state, TrajectoryColumns.of(trajs), step, current_version, drift_kl, **kw)


def traj(group: str, reward: float, *, prompt: str | None = None, version: int = 0, n_prompt: int = 10,
         n_completion: int = 7, n_obs: int = 0, n_verify: int = 0, k: int = 0) -> Trajectory:
    mask = [1] * n_completion + [0] * n_obs
    return Trajectory(traj_id=f"{group}-{k}", prompt_id=prompt or group, group_id=group, step=0,
                      behavior_version=version, prompt_ids=[1] * n_prompt, completion_ids=[2] * (n_completion + n_obs),
                      completion_mask=mask, behavior_logprobs=[0.0] * (n_completion + n_obs), reward=float(reward),
                      finish_reason="eos", tokens_verify=n_verify)


def group(name: str, rewards, **kw) -> list[Trajectory]:
    return [traj(name, r, k=i, **kw) for i, r in enumerate(rewards)]


# ------------------------------------------------------------------------------------------------ state updates


def test_posterior_update_binary_and_graded():
    cfg = BudgetConfig("marginal")
    state = BudgetState()
    update_state(cfg, state, group("a", [1, 0, 1, 1]) + group("b", [0.25, 0.75]), step=0, current_version=0)
    # Beta(1, 1) + 3 successes, 1 failure = Beta(4, 2); graded: Σr = 1, Σ(1 − r) = 1 → Beta(2, 2)
    assert (state.prompts["a"].alpha, state.prompts["a"].beta) == (4.0, 2.0)
    assert (state.prompts["b"].alpha, state.prompts["b"].beta) == (2.0, 2.0)
    assert state.step == 1


def test_a_prompt_with_two_groups_in_one_step_is_updated_twice_in_order():
    cfg = BudgetConfig("marginal", ema=0.5)
    state = BudgetState()
    steps = group("a1", [1, 0], prompt="a", n_completion=4) + group("b", [1, 1]) + \
        group("a2", [1, 1], prompt="a", n_completion=8)
    update_state(cfg, state, steps, step=0, current_version=0)
    s = state.prompts["a"]
    # Beta(1, 1) + (1 success, 1 failure) + (2 successes): Beta(4, 2); two groups; the last one was flat
    assert (s.alpha, s.beta, s.groups, s.zero_var_streak) == (4.0, 2.0, 2, 1)
    # rollout tokens per sample: 14 for the first group, then EMA 0.5·14 + 0.5·18 = 16
    assert s.tok_rollout == 16.0 and len(state.prompts) == 2


def test_state_round_trips_through_json():
    cfg = BudgetConfig("marginal")
    state = BudgetState()
    update_state(cfg, state, group("a", [1, 0, 1]) + group("b", [0, 0]), step=3, current_version=2, drift_kl=0.01)
    back = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert back.state_dict() == state.state_dict()
    assert back.prompts["b"] == PromptStats(1.0, 3.0, 0, 3, 1, 1, 17.0, 0.0, 17.0, seen=2.0)
    old = state.state_dict()  # a checkpoint from before `seen` was kept: its prompts read as never counted
    for v in old["prompts"].values():
        del v["seen"]
    assert BudgetState.from_state_dict(old).prompts["b"].seen == 0.0


def test_posterior_fades_with_drift():
    cfg = BudgetConfig("marginal", drift_scale=0.1, ema=0.0)
    state = BudgetState()
    update_state(cfg, state, group("a", [1, 0, 1, 1]), step=0, current_version=0, drift_kl=0.05)
    # two versions later, δ = 0.05: factor e^(−0.05·2/0.1) = e^-1; α = 1 + 3e^-1 = 2.10364, β = 1 + 1e^-1 + 2 = 3.36788
    update_state(cfg, state, group("a", [0, 0], version=2), step=1, current_version=2, drift_kl=0.05)
    s = state.prompts["a"]
    assert (s.alpha, s.beta) == pytest.approx((1 + 3 * math.exp(-1), 1 + math.exp(-1) + 2))
    assert s.version == 2


def test_plan_sees_faded_posterior():
    cfg = BudgetConfig("none", drift_prior=0.05, drift_scale=0.1)
    state = BudgetState(version=2, prompts={"a": PromptStats(alpha=4.0, beta=2.0, version=0)})
    (d,) = plan_prompts(cfg, state, ["a"], 0, np.random.default_rng(0), LIMITS)
    # faded Beta(1 + 3e^-1, 1 + e^-1) = Beta(2.10364, 1.36788), mean 2.10364/3.47152 = 0.60597
    assert d.pass_rate == pytest.approx(0.60597, abs=1e-5)


def test_drift_ema_and_staleness_in_prices():
    cfg = BudgetConfig("marginal", ema=0.9)
    state = BudgetState()
    update_state(cfg, state, [], step=0, current_version=0, drift_kl=0.02)
    update_state(cfg, state, [], step=1, current_version=0, drift_kl=0.04)
    assert state.drift == pytest.approx(0.9 * 0.02 + 0.1 * 0.04)  # 0.022
    dec = price_trajectories(cfg, state, group("g", [1, 0, 1, 0], version=3), current_version=5)
    # 2 versions stale at δ = 0.022, s = 0.1: D = exp(−0.44) = 0.644036
    assert all(d.staleness == 2 and d.depreciation == pytest.approx(math.exp(-0.44)) for d in dec)


def test_state_round_trip_json():
    cfg = BudgetConfig("marginal", token_budget=500)
    state = BudgetState()
    update_state(cfg, state, group("a", [1, 0, 1]) + group("b", [0, 0]), step=3, current_version=2, drift_kl=0.01)
    restored = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored == state
    assert BudgetState.from_state_dict(BudgetState().state_dict()) == BudgetState()


# --------------------------------------------------------------------------------------------------- planning


def test_uniform_plan_is_unchanged():
    cands = [f"p{i}" for i in range(16)]
    for policy in ("none", "zero_var", "max_var"):
        plan = plan_prompts(BudgetConfig(policy), BudgetState(), cands, 0, np.random.default_rng(0), LIMITS)
        assert [d.samples for d in plan] == [8] * 4 + [0] * 12


def test_default_prices_on_the_arithmetic_task():
    # tiny arithmetic task: 10 prompt + 7 completion tokens, 0/1 rewards, groups of 8 — with default prices a prompt
    # whose posterior is near 0.5 has a positive price and one near 0 or 1 a negative one
    cfg = BudgetConfig("marginal", posterior="mean")
    stats = dict(version=0, tok_rollout=17.0, tok_verify=0.0, tok_update=17.0)
    state = BudgetState(prompts={"mid": PromptStats(alpha=5.0, beta=5.0, **stats),
                                 "easy": PromptStats(alpha=30.0, beta=1.0, **stats),
                                 "hard": PromptStats(alpha=1.0, beta=30.0, **stats)})
    limits = SampleLimits(16, 8, 2, 16)
    plan = {d.prompt_id: d for d in plan_prompts(cfg, state, ["easy", "mid", "hard"], 0, np.random.default_rng(0), limits)}
    assert plan["mid"].samples >= 2 and plan["mid"].price > 0
    assert plan["easy"].samples == 0 and plan["easy"].price < 0 and plan["easy"].reason == "price"
    assert plan["hard"].samples == 0 and plan["hard"].price < 0 and plan["hard"].reason == "price"
    # an unseen prompt (Beta(1, 1), mean 0.5) is worth exploring at the default prices too
    (d,) = plan_prompts(cfg, BudgetState(), ["new"], 0, np.random.default_rng(0), limits)
    assert d.samples >= 2 and d.price > 0 and d.pass_rate == 0.5


def test_marginal_plan_spends_the_sample_budget():
    cfg = BudgetConfig("marginal")
    cands = [f"p{i}" for i in range(16)]
    plan = plan_prompts(cfg, BudgetState(), cands, 0, np.random.default_rng(0), LIMITS)
    assert sum(d.samples for d in plan) == LIMITS.samples_per_step  # 32: all unseen prompts are worth sampling
    assert all(d.samples == 0 or 2 <= d.samples <= 16 for d in plan)
    assert all(d.price > 0 for d in plan if d.samples)


def test_marginal_plan_caps_samples_under_a_token_budget():
    # LIMITS: 4 prompts × 8 = 32 samples per step. Fixed prices: 32 samples, no token limit. With a token budget of
    # 100 000 tokens (× slack 1.5) the sample cap binds: by default 1.5 × 32 = 48 samples, or max_samples_per_step
    assert planner_limits(BudgetConfig("marginal"), LIMITS) == (32, math.inf)
    assert planner_limits(BudgetConfig("marginal", token_budget=100_000), LIMITS) == (48, 150_000)
    assert planner_limits(BudgetConfig("marginal", token_budget=100_000, max_samples_per_step=10),
                          LIMITS) == (10, 150_000)
    cands = [f"p{i}" for i in range(16)]
    for cap, expected in ((0, 48), (10, 10)):
        cfg = BudgetConfig("marginal", token_budget=100_000, max_samples_per_step=cap, posterior="mean")
        plan = plan_prompts(cfg, BudgetState(), cands, 0, np.random.default_rng(0), LIMITS)
        assert sum(d.samples for d in plan) == expected  # unseen prompts (p = 0.5) are all worth sampling
        # 48 samples reach every candidate; 10 do not, and the others were skipped with the cap spent, not for price
        assert {d.reason for d in plan if not d.samples} == ({"budget"} if cap else set())


def test_pooled_prior_by_hand():
    # family f: 6 successes, 2 failures so far, of which prompt a's own are 2 successes; prompt c has no family
    cfg = BudgetConfig("marginal")
    state = BudgetState(families={"f": [6.0, 2.0, 0]}, family_of={"a": "f", "b": "f"})
    state.prompts["a"] = PromptStats(alpha=1 + 2, beta=1 + 0)
    arrays = policies.base.prompt_arrays(cfg, state, ["a", "b", "c"], pool_strength=4.0)
    # b (unseen): others (6, 2), μ = (6 + 1) / (6 + 2 + 2) = 0.7 -> Beta(2.8, 1.2)
    # a: others (4, 2), μ = 5 / 8 -> prior (2.5, 1.5), plus its own (2, 0) -> (4.5, 1.5); c: the global (1, 1)
    assert arrays.alpha == pytest.approx([4.5, 2.8, 1.0]) and arrays.beta == pytest.approx([1.5, 1.2, 1.0])
    off = policies.base.prompt_arrays(cfg, state, ["a", "b", "c"])  # pool_strength 0: the global prior
    assert off.alpha == pytest.approx([3.0, 1.0, 1.0]) and off.beta == pytest.approx([1.0, 1.0, 1.0])


def test_family_evidence_is_folded_and_fades_like_a_prompts():
    cfg = BudgetConfig("marginal", drift_prior=0.1, drift_scale=0.1)  # exp(-1) per version
    state = BudgetState(family_of={"a": "f", "b": "f"})
    update_state(cfg, state, group("a", [1, 0, 0, 0]), step=0, current_version=0)
    assert state.families == {"f": [1.0, 3.0, 0]}
    update_state(cfg, state, group("b", [1, 1], version=1), step=1, current_version=1)
    assert state.families["f"] == pytest.approx([1 * math.exp(-1) + 2, 3 * math.exp(-1), 1])
    restored = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.families == state.families and restored.family_of == {}  # the map is task data, not state


def test_a_never_solved_family_stops_being_sampled_before_each_prompt_is_tried():
    # 4 prompts of family `hard` failed 8 of 8 each; 8 more of them were never tried, nor 8 prompts of `new`
    cands = [f"hard{i}" for i in range(4, 12)] + [f"new{i}" for i in range(8)]
    family_of = {**{f"hard{i}": "hard" for i in range(12)}, **{f"new{i}": "new" for i in range(8)}}
    limits = SampleLimits(prompts_per_step=4, group_size=8, min_group_size=2, max_group_size=16)
    for strength, hard_sampled in ((0.0, True), (4.0, False)):
        cfg = BudgetConfig("marginal", pool_strength=strength, posterior="mean")
        state = BudgetState(family_of=family_of, families={"hard": [0.0, 32.0, 0]})
        plan = plan_prompts(cfg, state, cands, 0, np.random.default_rng(0), limits)
        hard = sum(d.samples for d in plan if d.prompt_id.startswith("hard"))
        assert (hard > 0) is hard_sampled, (strength, [(d.prompt_id, d.samples) for d in plan])
        assert sum(d.samples for d in plan if d.prompt_id.startswith("new")) > 0


def test_family_pairs_are_folded_with_pool_dispersion_only():
    # a group's passing ordered pairs s² − Σr²: [1, 1, 1, 0] -> 9 − 3 = 6 = 3·2 of 4·3 = 12; graded [0.5, 0.5] ->
    # 1 − 0.5 = 0.5 of 2 (E[r_i·r_j] = 0.25 each); faded as the family's counts (exp(−1) a version here)
    cfg = BudgetConfig("marginal", pool_strength=4.0, pool_dispersion=True, drift_prior=0.1, drift_scale=0.1)
    state = BudgetState(family_of={"a": "f", "b": "f"})
    update_state(cfg, state, group("a", [1, 1, 1, 0]), step=0, current_version=0)
    assert state.family_pairs == {"f": [6.0, 12.0, 0]} and state.families == {"f": [3.0, 1.0, 0]}
    update_state(cfg, state, group("b", [0.5, 0.5], version=1), step=1, current_version=1)
    assert state.family_pairs["f"] == pytest.approx([6 * math.exp(-1) + 0.5, 12 * math.exp(-1) + 2, 1])
    restored = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.family_pairs == state.family_pairs
    off = BudgetState(family_of={"a": "f"})
    update_state(BudgetConfig("marginal", pool_strength=4.0), off, group("a", [1, 1, 1, 0]), step=0,
                 current_version=0)
    assert off.family_pairs == {} and off.families == {"f": [3.0, 1.0, 0]}


def test_dispersion_pooled_prior_by_hand():
    # family f: 20 successes, 20 failures in 10 groups of 4, its prompts each solved or not (60 passing pairs of 120):
    # strength 0.5 (pricing.family_strength). Family g: 20/20 again, every group mixed 2-of-4 (Q = 10·2 = 20, Q/M =
    # 1/6 < μ² = 1/4: no spread): strength 176/11.2 − 1 = 14.714. Unseen prompts: Beta(k·μ, k·(1 − μ)), μ = 21/42
    cfg = BudgetConfig("marginal", pool_strength=4.0, pool_dispersion=True)
    state = BudgetState(families={"f": [20.0, 20.0, 0], "g": [20.0, 20.0, 0]},
                        family_pairs={"f": [60.0, 120.0, 0], "g": [20.0, 120.0, 0]}, family_of={"a": "f", "b": "g"})
    arrays = policies.base.prompt_arrays(cfg, state, ["a", "b", "c"], pool_strength=4.0)
    k = 176 / 11.2 - 1
    assert arrays.alpha == pytest.approx([0.25, k / 2, 1.0]) and arrays.beta == pytest.approx([0.25, k / 2, 1.0])
    # the same prompts after a 2-of-2 pilot: f's reads as nearly solved, (2.25, 0.25) mean 0.9; g's barely moves
    assert (arrays.alpha[:2] + 2) / (arrays.alpha[:2] + 2 + arrays.beta[:2]) == pytest.approx([0.9, (k / 2 + 2) / (k + 2)])
    # logged each step: the families' strengths (not faded here: every book is at the current version)
    metrics = step_metrics(PromptPlan.of([]), TrajectoryPrices.of([]), TrajectoryColumns.of([]), state, cfg=cfg)
    assert [metrics[f"budget/family_strength_{s}"] for s in ("min", "median", "max")] == pytest.approx(
        [0.5, (0.5 + k) / 2, k])
    assert "budget/family_strength_min" not in step_metrics(
        PromptPlan.of([]), TrajectoryPrices.of([]), TrajectoryColumns.of([]), state,
        cfg=BudgetConfig("marginal", pool_strength=4.0))
    with pytest.raises(ValueError, match="pool_dispersion: estimates the strength of the family prior"):
        BudgetConfig("marginal", pool_dispersion=True)


def test_dispersion_from_the_probes_by_hand():
    # dispersion_source: probes. Family f's two probes read 0 and 1 (each prompt solved or not): rates [1, 1],
    # squares [1, 2]; μ = 0.5, Q/M = 0.5, ρ̂ = (0.5 − 0.25)/0.25 = 1, shrunk to 1/(4 + 1) worth 8 probes:
    # ρ = (2·1 + 8/5)/10 = 0.36, k = 1/0.36 − 1. Family g's read 0.5 and 0.5 (no spread): ρ = 1.6/10, k = 5.25
    cfg = BudgetConfig("marginal", pool_strength=4.0, pool_dispersion=True, dispersion_source="probes",
                       probe_strength=16.0, drift_prior=0.1, drift_scale=0.1)
    state = BudgetState(families={"f": [10.0, 10.0, 0], "g": [10.0, 10.0, 0]},
                        family_of={"a1": "f", "a2": "f", "a3": "f", "b1": "g", "b2": "g", "b3": "g"})
    fold_probe(cfg, state, ["a1", "a2", "b1", "b2"], [0.0, 1.0, 0.5, 0.5], 0, 16.0, step=0)
    assert state.family_probe_rates == {"f": [1.0, 1.0, 0], "g": [1.0, 1.0, 0]}
    assert state.family_probe_squares == {"f": [1.0, 2.0, 0], "g": [0.5, 2.0, 0]}
    assert state.family_probes == {}  # (pool_probes is off: the family's pass rate still counts the groups only)
    kf, kg = 1 / 0.36 - 1, 1 / 0.16 - 1
    # the unseen siblings: Beta(k·μ, k·(1 − μ)), μ = (10 + 1)/(20 + 2) from the groups' counts
    arrays = policies.base.prompt_arrays(cfg, state, ["a3", "b3"], pool_strength=4.0)
    assert arrays.alpha == pytest.approx([kf / 2, kg / 2]) and arrays.beta == pytest.approx([kf / 2, kg / 2])
    metrics = step_metrics(PromptPlan.of([]), TrajectoryPrices.of([]), TrajectoryColumns.of([]), state, cfg=cfg)
    assert [metrics[f"budget/family_strength_{s}"] for s in ("min", "median", "max")] == pytest.approx(
        [kf, (kf + kg) / 2, kg])
    # the groups add no pairs under this source; a probe one version later finds the books faded by exp(−1)
    update_state(cfg, state, group("a1", [1, 1, 1, 0]), step=0, current_version=0)
    assert state.family_pairs == {}
    fold_probe(cfg, state, ["a3"], [0.25], 1, 16.0, step=1)
    assert state.family_probe_rates["f"] == pytest.approx([math.exp(-1) + 0.25, math.exp(-1) + 0.75, 1])
    assert state.family_probe_squares["f"] == pytest.approx([math.exp(-1) + 0.0625, 2 * math.exp(-1) + 1, 1])
    restored = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert (restored.family_probe_rates, restored.family_probe_squares) == (state.family_probe_rates,
                                                                             state.family_probe_squares)
    # with the groups' source (the default) the probe books stay empty
    groups = BudgetState(family_of={"a1": "f"})
    fold_probe(BudgetConfig("marginal", pool_strength=4.0, pool_dispersion=True, probe_strength=16.0), groups,
               ["a1"], [0.5], 0, 16.0, step=0)
    assert groups.family_probe_rates == {} and groups.family_probe_squares == {}
    with pytest.raises(ValueError, match="dispersion_source: probes measures each family's spread"):
        BudgetConfig("marginal", pool_strength=4.0, pool_dispersion=True, dispersion_source="probes")
    with pytest.raises(ValueError, match="dispersion_source: read only with budget.pool_dispersion"):
        BudgetConfig("marginal", pool_strength=4.0, probe_strength=16.0, dispersion_source="probes")


def test_expected_posterior_prices_a_wide_posterior_at_its_expectation_not_its_luckiest_draw():
    # one group's worth of samples (4) and 32 candidates: `known` had 1 success and 1 failure (Beta(2, 2), E[4p(1−p)]
    # = 16/20 = 0.8), 31 are unseen (Beta(1, 1): 2/3 each). Priced at the expectation, `known` always wins the group;
    # under Thompson sampling one of the 31 unseen prompts' draws usually lands nearer 0.5 than known's draw
    limits = SampleLimits(prompts_per_step=1, group_size=4, min_group_size=2, max_group_size=16)
    cands = ["known"] + [f"new{i}" for i in range(31)]
    stats = dict(version=0, tok_rollout=20.0, tok_verify=0.0, tok_update=20.0)  # an unseen prompt's (prior_tokens)
    wins = {}
    for posterior in ("expected", "thompson"):
        cfg = BudgetConfig("marginal", posterior=posterior)
        won = 0
        for seed in range(50):
            state = BudgetState(prompts={"known": PromptStats(alpha=2.0, beta=2.0, **stats)})
            plan = plan_prompts(cfg, state, cands, 0, np.random.default_rng(seed), limits)
            assert sum(d.samples for d in plan) == 4
            won += plan[0].samples == 4
        wins[posterior] = won
    assert wins["expected"] == 50 and wins["thompson"] < 15, wins
    # and a prompt seen failing twice (Beta(1, 3): 12/20 = 0.6 < 2/3) loses to an unseen one
    state = BudgetState(prompts={"failed": PromptStats(alpha=1.0, beta=3.0, **stats)})
    plan = plan_prompts(BudgetConfig("marginal", posterior="expected"), state, ["failed", "new"], 0,
                        np.random.default_rng(0), limits)
    assert [d.samples for d in plan] == [0, 4]
    assert plan[1].gain == pytest.approx(2 / 3 * 3 / 12) and plan[1].sampled_rate == 0.5  # G(4) = V·(2/3)·3/12


def test_family_weight_by_hand():
    # family a: 6 + 2 = 8 samples at version 0; N0 = 8 -> 8/(8 + 8) = 0.5. Family b was never sampled, c has no
    # family: 1. One version later at drift 0.1, scale 0.1, a's count keeps exp(−1): 8/(8 + 8/e)
    cfg = BudgetConfig("marginal", drift_prior=0.1, drift_scale=0.1)
    state = BudgetState(families={"a": [6.0, 2.0, 0]}, family_of={"a1": "a", "a2": "a", "b1": "b"})
    w = policies.base.family_weight(cfg, state, ["a1", "a2", "b1", "c1"], 8.0)
    assert w == pytest.approx([0.5, 0.5, 1.0, 1.0])
    state.version = 1
    assert policies.base.family_weight(cfg, state, ["a1"], 8.0) == pytest.approx([8 / (8 + 8 / math.e)])


def test_family_rows_look_each_candidate_up_once_and_read_the_books_as_the_ids_do():
    state = BudgetState(families={"a": [6.0, 2.0, 0], "b": [1.0, 3.0, 1]}, family_probes={"b": [4.0, 4.0, 1]},
                        family_of={"a1": "a", "a2": "a", "b1": "b", "c1": "c", "e": ""}, version=2)
    cfg = BudgetConfig("marginal", drift_prior=0.1, drift_scale=0.1)
    ids = ["b1", "a1", "x", "c1", "a2", "e"]  # x: not in family_of; c: a family with no evidence; e: "" (none)
    rows = policies.base.family_rows(state, ids)
    assert rows.names == ["b", "a", "c"] and rows.index.tolist() == [0, 1, 3, 2, 1, 3]
    # faded to version 2 at drift 0.1, scale 0.1: a (version 0) keeps exp(−2), b (version 1) exp(−1)
    has, s, f = policies.base.family_counts(cfg, state, rows)
    assert has.tolist() == [True, True, False, False, True, False]
    assert s.tolist() == pytest.approx([math.exp(-1), 6 * math.exp(-2), 0, 0, 6 * math.exp(-2), 0])
    assert f.tolist() == pytest.approx([3 * math.exp(-1), 2 * math.exp(-2), 0, 0, 2 * math.exp(-2), 0])
    has, s, f = policies.base.family_counts(cfg, state, rows, state.family_probes)  # another book, the same rows
    assert has.tolist() == [True, False, False, False, False, False]
    assert s.tolist() == f.tolist() == pytest.approx([4 * math.exp(-1), 0, 0, 0, 0, 0])


def test_family_balance_moves_a_group_to_the_family_sampled_less():
    # two unseen prompts, one group's worth of samples: without the weight the first candidate wins the tie; with
    # N0 = 8 its family (24 samples so far: weight 8/32 = 0.25) loses to the other's (never sampled: 1). Priced
    # gains: a skipped prompt at its smallest group (2: G = 1·1·1/10 = 0.1, × 0.25 for x), a sampled one at 4 (3/12)
    limits = SampleLimits(prompts_per_step=1, group_size=4, min_group_size=2, max_group_size=16)
    state = BudgetState(families={"busy": [12.0, 12.0, 0]}, family_of={"x": "busy", "y": "quiet"})
    off = plan_prompts(BudgetConfig("marginal", posterior="mean"), state, ["x", "y"], 0, np.random.default_rng(0),
                       limits)
    on = plan_prompts(BudgetConfig("marginal", posterior="mean", family_half_samples=8.0), state, ["x", "y"], 0,
                      np.random.default_rng(0), limits)
    assert [d.samples for d in off] == [4, 0] and [d.samples for d in on] == [0, 4]
    assert (off[0].gain, off[1].gain) == pytest.approx((0.25, 0.1))
    assert (on[0].gain, on[1].gain) == pytest.approx((0.025, 0.25))


def test_revisit_balance_by_hand():
    # a prompt's samples are counted and fade with its evidence: a group of 3 at version 0, then at drift 0.1, scale
    # 0.1 a group of 2 at version 1 adds to 3/e. Two prompts at the same posterior Beta(2, 2) (p = 0.5), one group's
    # worth of samples: "old" was sampled 8 times, "new" twice; with N0 = 8 their gains weigh 8/16 and 8/10, so the
    # group moves to "new" (without the weight the first candidate wins the tie)
    cfg = BudgetConfig("marginal", drift_prior=0.1, drift_scale=0.1)
    state = BudgetState()
    update_state(cfg, state, group("a", [1, 0, 1]), step=0, current_version=0, drift_kl=None)
    update_state(cfg, state, group("a1", [1, 0], prompt="a", version=1), step=1, current_version=1, drift_kl=None)
    assert state.prompts["a"].seen == pytest.approx(3 / math.e + 2)
    limits = SampleLimits(prompts_per_step=1, group_size=4, min_group_size=2, max_group_size=16)
    state = BudgetState(prompts={"old": PromptStats(2.0, 2.0, seen=8.0), "new": PromptStats(2.0, 2.0, seen=2.0)})
    arrays = policies.base.prompt_arrays(cfg, state, ["old", "new", "unseen"])
    assert arrays.seen.tolist() == [8.0, 2.0, 0.0]
    plan = {n0: plan_prompts(BudgetConfig("marginal", posterior="mean", prompt_half_samples=n0), state,
                             ["old", "new"], 0, np.random.default_rng(0), limits) for n0 in (0.0, 8.0)}
    assert [d.samples for d in plan[0.0]] == [4, 0] and [d.samples for d in plan[8.0]] == [0, 4]
    # priced gains: the sampled prompt at its group of 4 (G = 1·1·3/12), the skipped at its smallest (2: 1/10)
    assert (plan[8.0][0].gain, plan[8.0][1].gain) == pytest.approx((0.1 * 8 / 16, 0.25 * 8 / 10))
    with pytest.raises(ValueError, match="prompt_half_samples: expected a number >= 0"):
        BudgetConfig("marginal", prompt_half_samples=-1)


def test_prior_plan_skips_zero_variance_history():
    cfg = BudgetConfig("prior", explore_prob=0.0)
    state = BudgetState(prompts={f"p{i}": PromptStats(1.0, 9.0, zero_var_streak=1) for i in (0, 2, 3)})
    plan = plan_prompts(cfg, state, [f"p{i}" for i in range(8)], 0, np.random.default_rng(0), LIMITS)
    # explore_prob**1 = 0: p0, p2, p3 never rolled out; the first 4 others are taken
    assert [d.samples for d in plan] == [0, 8, 0, 0, 8, 8, 8, 0]
    assert plan.reasons == ["history", "", "history", "history", "", "", "", "pool_full"]


def test_prior_plan_explores_with_probability():
    cfg = BudgetConfig("prior", explore_prob=0.5)
    state = BudgetState(prompts={"z": PromptStats(1.0, 9.0, zero_var_streak=2)})
    limits = SampleLimits(1, 8, 2, 16)
    rng = np.random.default_rng(0)
    hits = sum(plan_prompts(cfg, state, ["z"], s, rng, limits)[0].samples > 0 for s in range(4000))
    assert hits / 4000 == pytest.approx(0.25, abs=0.03)  # 0.5² = 0.25


# --------------------------------------------------------------------------------------------------- pricing


def test_fates_by_policy():
    trajs = group("mixed", [1, 0, 0, 1]) + group("flat", [1, 1, 1, 1])
    by = {p: [d.fate for d in price_trajectories(BudgetConfig(p), BudgetState(), trajs, 0)] for p in POLICIES}
    assert by["none"] == ["trained"] * 8
    assert by["zero_var"] == by["prior"] == ["trained"] * 4 + ["zero_signal"] * 4
    assert by["max_var"].count("trained") == 4  # m = round(0.5·4) = 2 per group
    assert by["max_var"][:4].count("trained") == 2 and sorted(trajs[i].reward for i in range(4) if by["max_var"][i] == "trained") == [0, 1]
    assert by["marginal"] == ["trained"] * 4 + ["zero_signal"] * 4


def test_marginal_drops_a_group_whose_admitted_subset_has_no_signal():
    # the hand-computed group of test_trajectory_price_by_hand: failures priced at −0.0016 with ρ = 1, n0 = 4,
    # κ_u·tokens = 0.01 → only the success would be admitted, which alone carries no signal → all dropped_price
    cfg = BudgetConfig("marginal", risk_aversion=1.0, gain_half_samples=4.0, kappa_update=1e-3)
    dec = price_trajectories(cfg, BudgetState(), group("g", [1, 0, 0, 0], n_prompt=4, n_completion=6), 0)
    assert [d.price > 0 for d in dec] == [True, False, False, False]
    assert [d.fate for d in dec] == ["dropped_price"] * 4
    # at ρ = 0.5 the failures are worth 0.0625 − 0.01 − 0.0271 = 0.0254 > 0: all trained
    cfg = BudgetConfig("marginal", risk_aversion=0.5, gain_half_samples=4.0, kappa_update=1e-3)
    dec = price_trajectories(cfg, BudgetState(), group("g", [1, 0, 0, 0], n_prompt=4, n_completion=6), 0)
    assert [d.fate for d in dec] == ["trained"] * 4


def test_marginal_drops_stale():
    cfg = BudgetConfig("marginal", drift_prior=0.1, drift_scale=0.1)
    fresh = price_trajectories(cfg, BudgetState(), group("g", [1, 0, 1, 0]), current_version=0)
    stale = price_trajectories(cfg, BudgetState(), group("g", [1, 0, 1, 0]), current_version=5)
    assert [d.fate for d in fresh] == ["trained"] * 4
    assert [d.fate for d in stale] == ["dropped_stale"] * 4  # D = e^-5: the gain is gone, the risk is not
    assert all(d.risk_staleness > 0 and d.risk == pytest.approx(d.risk_variance + d.risk_staleness) for d in stale)


def test_cvar_prices_more_risk_than_std():
    trajs = group("g", [1, 0, 0, 1, 0])
    std = price_trajectories(BudgetConfig("marginal"), BudgetState(), trajs, 0)
    cvar = price_trajectories(BudgetConfig("marginal", risk_measure="cvar", cvar_alpha=0.1), BudgetState(), trajs, 0)
    for a, b in zip(std, cvar, strict=True):
        assert b.risk == pytest.approx(a.risk * 1.75498, rel=1e-4)


# ------------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("policy", POLICIES)
def test_empty_step(policy):
    cfg, state = BudgetConfig(policy), BudgetState()
    assert list(price_trajectories(cfg, state, [], 0)) == []
    update_state(cfg, state, [], step=0, current_version=0, prices=TrajectoryPrices.of([]))
    assert list(plan_prompts(cfg, state, [], 0, np.random.default_rng(0), LIMITS)) == []
    metrics = step_metrics(PromptPlan.of([]), TrajectoryPrices.of([]), TrajectoryColumns.of([]), state, cfg=cfg)
    assert metrics["budget/prompts_sampled"] == 0 and math.isnan(metrics["budget/admitted_fraction"])
    assert {k: v.tolist() for k, v in price_histograms(TrajectoryPrices.of([])).items()} == {k: [] for k in COMPONENTS}


def test_all_groups_zero_variance():
    trajs = group("a", [0, 0, 0]) + group("b", [1, 1]) + group("c", [0.5, 0.5])
    for policy in ("zero_var", "prior", "marginal"):
        dec = price_trajectories(BudgetConfig(policy), BudgetState(), trajs, 0)
        assert all(d.fate == "zero_signal" and d.gain == 0 for d in dec)


# --------------------------------------------------------------------------------------------------- controller


def _simulated_step(cfg, state, step, rng, prompts):
    """Plan, roll out synthetic 0/1 rewards (pass rate fixed per prompt), price, update: returns the spend."""
    cands = [str(p) for p in rng.choice(list(prompts), 32, replace=False)]
    plan = plan_prompts(cfg, state, cands, step, rng, LIMITS)
    trajs = [traj(f"{step}-{d.prompt_id}", float(rng.random() < prompts[d.prompt_id]), prompt=d.prompt_id, k=k)
             for d in plan for k in range(d.samples)]
    dec = price_trajectories(cfg, state, trajs, 0)
    update_state(cfg, state, trajs, step, 0, prices=dec)
    return state.last_spend


def test_controller_converges_to_the_token_budget():
    # budget 1500 tokens/step (rollout + training); at the default κ the planner would spend the slack cap (2250),
    # so κ must rise until the marginal sample's price is zero at the budget (the dual variable). The sample cap is
    # lifted so that only the token budget binds (its default, 1.5 × 32 = 48 samples ≈ 1300 tokens, would bind first)
    cfg = BudgetConfig("marginal", token_budget=1500, controller_rate=0.2, max_samples_per_step=1000)
    rng = np.random.default_rng(0)
    prompts = {f"p{i}": float(p) for i, p in enumerate(rng.uniform(0.05, 0.95, 200))}
    state = BudgetState()
    spends, scales = [], []
    for step in range(150):
        spends.append(_simulated_step(cfg, state, step, rng, prompts))
        scales.append(state.kappa_scale)
    assert np.mean(spends[1:11]) > 1.25 * 1500  # starts over budget (≈ 2000 tokens/step at κ-scale ≈ 1)
    assert np.mean(spends[-50:]) == pytest.approx(1500, rel=0.1)  # spend tracks the budget
    assert scales[-1] > 1.5  # the price rose
    assert np.std(np.log(scales[-50:])) < 0.3  # and settled


def test_controller_lowers_price_when_under_budget():
    cfg = BudgetConfig("marginal", token_budget=100_000, controller_rate=0.5)
    state = BudgetState(kappa_scale=10.0)
    update_state(cfg, state, group("g", [1, 0]), step=0, current_version=0)
    # spend = 2·(17 rollout + 17 train) = 68 ≪ 100000: scale·exp(0.5·(68/1e5 − 1)) = 10·e^-0.49966 = 6.0674
    assert state.last_spend == 68
    assert state.kappa_scale == pytest.approx(10 * math.exp(0.5 * (68 / 1e5 - 1)))


def test_run_pace_updates_on_the_runs_spend_by_hand():
    # step 0: one group of 2 (spend 2·(17 + 17) = 68), step 1: a group of 6 (spend 204); budget 100 per step, rate 0.5
    step_cfg = BudgetConfig("marginal", token_budget=100, controller_rate=0.5)
    run_cfg = BudgetConfig("marginal", token_budget=100, controller_rate=0.5, pace="run")
    scales = {}
    for name, cfg in (("step", step_cfg), ("run", run_cfg)):
        state = BudgetState()
        update_state(cfg, state, group("a", [1, 0]), step=0, current_version=0)
        first = state.kappa_scale
        update_state(cfg, state, group("b", [1, 0, 1, 0, 1, 0]), step=1, current_version=0)
        assert (state.last_spend, state.spent_total) == (204, 272)
        scales[name] = (first, state.kappa_scale)
    # step 0 is the same either way: exp(0.5·(68/100 − 1)) = exp(−0.16)
    assert scales["step"][0] == scales["run"][0] == pytest.approx(math.exp(-0.16))
    # step 1 (spend 204/100): pace=step moves by rate·1.04 = 0.52, pace=run by rate/√2·1.04 = 0.367696
    assert scales["step"][1] == pytest.approx(math.exp(-0.16 + 0.52))
    assert scales["run"][1] == pytest.approx(math.exp(-0.16 + 0.5 / math.sqrt(2) * 1.04))


def _paced(pace: str, values: list[float], budget: float, steps: int) -> tuple[list[float], list[float], BudgetState]:
    """Steps whose spend at price scale κ is value/κ (a step with worth-while samples buys more), under control_price."""
    from marginal_rl.budget.policies.marginal import control_price

    cfg = BudgetConfig("marginal", token_budget=budget, controller_rate=0.3, pace=pace)
    state, spends, scales = BudgetState(), [], []
    for t in range(steps):
        state.last_spend = values[t % len(values)] / state.kappa_scale
        state.spent_total += state.last_spend
        state.step = t + 1
        spends.append(state.last_spend)
        control_price(cfg, state)
        scales.append(state.kappa_scale)
    return spends, scales, state


def test_run_pace_converges_to_one_price_and_spends_the_runs_budget():
    # Steps alternate between samples worth 1000 and 3000 tokens at κ = 1; the budget is 2000 per step. By hand:
    # one price for the run spends value/κ on each step, so Σ = 2000·T at κ* = mean(1000, 3000)/2000 = 1.0, and
    # the cheap steps buy 1000, the rich ones 3000 (equal marginal price on every step).
    spends, scales, state = _paced("run", [1000, 3000], 2000, 400)
    assert abs(math.log(scales[-1])) < 0.05  # κ → κ* = 1.0
    assert max(scales[-100:]) / min(scales[-100:]) < 1.03  # one price for the run
    assert np.mean(spends[-100::2]) / np.mean(spends[-99::2]) == pytest.approx(1 / 3, rel=0.05)
    assert state.spent_total == pytest.approx(2000 * 400, rel=0.01)
    # pace=step answers each step one step late: its price alternates (0.96 / 1.14), so the marginal token is priced
    # differently on alternate steps and the cheap steps are not the ones that save
    _, step_scales, _ = _paced("step", [1000, 3000], 2000, 400)
    assert max(step_scales[-100:]) / min(step_scales[-100:]) > 1.15


def test_run_pace_lets_the_planner_spend_what_earlier_steps_saved():
    cfg = BudgetConfig("marginal", token_budget=1000, pace="run")
    state = BudgetState(step=3, spent_total=1500)  # 3 steps at a pace of 1000: 1500 tokens under
    from marginal_rl.budget.policies.marginal import run_credit

    assert run_credit(cfg, state) == 1500
    assert planner_limits(cfg, LIMITS, run_credit(cfg, state)) == (48, 1000 * 1.5 + 1500)
    assert planner_limits(cfg, LIMITS, -500.0) == (48, 1500)  # over pace: no credit, the slack cap stays
    step_cfg = BudgetConfig("marginal", token_budget=1000)
    assert planner_limits(step_cfg, LIMITS, 1500.0) == (48, 1500)  # pace=step never carries tokens over
    restored = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.spent_total == 1500  # a resumed run keeps its pace


def test_run_pace_needs_a_token_budget():
    with pytest.raises(ValueError, match="pace: run paces"):
        BudgetConfig("marginal", pace="run")
    with pytest.raises(ValueError, match="pace: expected 'step' or 'run'"):
        BudgetConfig("marginal", token_budget=10, pace="weekly")


def test_fixed_prices_do_not_move():
    state = BudgetState()
    update_state(BudgetConfig("marginal"), state, group("g", [1, 0]), step=0, current_version=0)
    assert state.kappa_scale == 1.0


# --------------------------------------------------------------------------------------------------- properties

rewards_st = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1, allow_nan=False))


@st.composite
def steps(draw):
    trajs = []
    for g in range(draw(st.integers(0, 6))):
        n = draw(st.integers(1, 9))
        binary = draw(st.booleans())
        version = draw(st.integers(0, 3))
        for k in range(n):
            r = draw(st.sampled_from([0.0, 1.0])) if binary else draw(rewards_st)
            trajs.append(traj(f"g{g}", r, version=version, k=k, n_prompt=draw(st.integers(1, 30)),
                              n_completion=draw(st.integers(0, 30)), n_obs=draw(st.integers(0, 5))))
    return trajs


@settings(max_examples=150, deadline=None)
@given(trajs=steps(), policy=st.sampled_from(list(POLICIES)), risk=st.floats(0, 2), drift=st.floats(0, 0.2),
       current=st.integers(0, 5))
def test_fate_invariants(trajs, policy, risk, drift, current):
    cfg = BudgetConfig(policy, risk_aversion=risk, drift_prior=drift)
    dec = price_trajectories(cfg, BudgetState(), trajs, current)
    assert len(dec) == len(trajs)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.group_id, []).append(i)
    for idx in groups.values():
        flat = len({trajs[i].reward for i in idx}) == 1
        trained = [i for i in idx if dec[i].trained]
        if policy in ("zero_var", "prior", "marginal"):
            assert not (flat and trained)  # no trained trajectory in a zero-variance group
        if policy == "marginal" and trained:
            assert len(trained) >= 2 and len({trajs[i].reward for i in trained}) > 1
    if policy == "marginal":
        assert all(d.price > 0 for d in dec if d.trained)  # no trained trajectory with a non-positive price
    for d in dec:
        assert d.price == pytest.approx(d.gain - d.cost - d.risk)
        assert d.risk == pytest.approx(d.risk_variance + d.risk_staleness)


@settings(max_examples=60, deadline=None)
@given(n_cands=st.integers(0, 40), per_step=st.integers(1, 8), size=st.integers(2, 8), seed=st.integers(0, 99),
       policy=st.sampled_from(list(POLICIES)), budget=st.sampled_from([0, 50, 400]))
def test_plan_invariants(n_cands, per_step, size, seed, policy, budget):
    limits = SampleLimits(per_step, size, 2, size + 4)
    cfg = BudgetConfig(policy, **({"token_budget": budget} if policy == "marginal" else {}))
    cands = [f"p{i}" for i in range(n_cands)]
    plan = plan_prompts(cfg, BudgetState(), cands, 0, np.random.default_rng(seed), limits)
    assert [d.prompt_id for d in plan] == cands
    assert all(d.samples == 0 or limits.min_group_size <= d.samples <= limits.max_group_size for d in plan)
    if budget == 0:
        assert sum(d.samples for d in plan) <= limits.samples_per_step
    elif policy == "marginal":
        assert sum(d.tokens for d in plan if d.samples) <= budget * cfg.budget_slack + 1e-6
        assert sum(d.samples for d in plan) <= limits.samples_per_step * cfg.budget_slack  # the default sample cap


def test_config_validation():
    with pytest.raises(ValueError, match="risk_measure: expected"):
        BudgetConfig(risk_measure="var")
    with pytest.raises(ValueError, match="token_budget: expected"):
        BudgetConfig("marginal", token_budget=-1)
    with pytest.raises(ValueError, match="max_samples_per_step: expected"):
        BudgetConfig("marginal", max_samples_per_step=-1)
    with pytest.raises(ValueError, match="cvar_alpha: expected"):
        BudgetConfig(cvar_alpha=0.0)
    with pytest.raises(ValueError, match="kappa_scale_max: expected"):
        BudgetConfig("marginal", kappa_scale_min=2.0, kappa_scale_max=1.0)
    with pytest.raises(ValueError, match="explore_prob: expected"):
        BudgetConfig("prior", explore_prob=1.5)
    with pytest.raises(ValueError, match="keep_fraction: expected"):
        BudgetConfig("max_var", keep_fraction=0.0)
    with pytest.raises(ValueError, match="policy: expected one of"):
        BudgetConfig("greedy")
    with pytest.raises(ValueError, match="family_half_samples: expected a number >= 0"):
        BudgetConfig("marginal", family_half_samples=-1.0)
    with pytest.raises(ValueError, match=r"posterior: expected one of \['thompson', 'mean', 'expected'\], got 'ucb'"):
        BudgetConfig("marginal", posterior="ucb")
    with pytest.raises(TypeError, match="token_budget"):  # a key of another policy (the loader names it: test_config)
        BudgetConfig("none", token_budget=100)


def test_clearing_scale_finds_the_price_at_which_the_plan_spends_the_budget_by_hand():
    # planned(m) = 1000/m tokens: the budget 2000 is spent at m = 0.5 (bisection from below: never above it)
    m = clearing_scale(lambda m: 1000 / m, 2000, 1e-3, 5.0)
    assert m == pytest.approx(0.5, rel=1e-2) and m <= 0.5  # 10 halvings of ln(5000): within 0.9 %
    # another limit caps the plan at 800 tokens: the highest price at which it still plans all 800 is 1000/800
    assert clearing_scale(lambda m: min(1000 / m, 800), 2000, 1e-3, 5.0) == pytest.approx(1.25, rel=1e-2)
    assert clearing_scale(lambda m: 0.0, 2000, 1e-3, 5.0) == 5.0  # nothing at any price: the price stays


def test_discover_price_turns_an_empty_plan_into_one_that_spends_the_budget():
    limits = SampleLimits(4, 4, 2, 8)
    candidates = [f"p{i}" for i in range(16)]
    plans = {}
    for discover in (False, True):
        cfg = BudgetConfig("marginal", token_budget=2000, discover_price=discover, prior_tokens=300, posterior="mean")
        state = BudgetState(kappa_scale=5.0)  # long samples at a high price: every price is negative
        plans[discover] = (plan_prompts(cfg, state, candidates, 0, np.random.default_rng(0), limits), state)
    empty, state = plans[False]
    assert empty.samples.sum() == 0 and state.kappa_scale == 5.0 and set(empty.reasons) == {"price"}
    plan, state = plans[True]
    assert plan.samples.sum() > 0 and state.kappa_scale < 5.0
    assert plan.tokens[plan.samples > 0].sum() >= 2000  # the plan at the discovered price spends the budget...
    assert (plan.price[plan.samples > 0] > 0).all()
    # ...and a price 1 % higher would not (the discovered price is the highest that does)
    higher = BudgetState(kappa_scale=state.kappa_scale * 1.01)
    cfg = BudgetConfig("marginal", token_budget=2000, prior_tokens=300, posterior="mean")
    above = plan_prompts(cfg, higher, candidates, 0, np.random.default_rng(0), limits)
    assert above.tokens[above.samples > 0].sum() < 2000
    with pytest.raises(ValueError, match="discover_price: true finds the price"):
        BudgetConfig("marginal", discover_price=True)
