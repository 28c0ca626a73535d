"""The token ledger: hand-counted totals by use and fate, derived metrics, round-trips, invariants."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marginal_rl.budget.ledger import USES, Ledger
from marginal_rl.budget.metrics import price_histograms, step_metrics
from marginal_rl.budget.records import FATES, PromptDecision, PromptPlan, TrajectoryDecision, TrajectoryPrices
from marginal_rl.budget.state import BudgetState
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns


def traj(group: str, reward: float, n_prompt: int, n_policy: int, n_obs: int = 0, n_verify: int = 0) -> Trajectory:
    n = n_policy + n_obs
    return Trajectory(traj_id=f"{group}-{reward}-{n}", prompt_id=group, group_id=group, step=0, behavior_version=0,
                      prompt_ids=[0] * n_prompt, completion_ids=[0] * n, completion_mask=[1] * n_policy + [0] * n_obs,
                      behavior_logprobs=[0.0] * n, reward=reward, finish_reason="eos", tokens_verify=n_verify)


def _step():
    # group a (signal): 10+5 and 10+7 (+3 observation of which 2 verify) tokens, rewards 1, 0 → both trained
    # group b (no signal): two 10+4, rewards 0, 0 → zero_signal
    trajs = [traj("a", 1.0, 10, 5), traj("a", 0.0, 10, 7, n_obs=3, n_verify=2), traj("b", 0.0, 10, 4),
             traj("b", 0.0, 10, 4)]
    decs = [TrajectoryDecision("trained"), TrajectoryDecision("trained"), TrajectoryDecision("zero_signal"),
            TrajectoryDecision("zero_signal")]
    return trajs, decs


def test_record_step_by_hand():
    ledger = Ledger()
    trajs, decs = _step()
    ledger.record_step(TrajectoryColumns.of(trajs), TrajectoryPrices.of(decs), num_iterations=2, prompts_skipped=3)
    # prefill 4·10 = 40; decode 5+7+4+4 = 20; observation 3 − 2 = 1; verify 2; rollout 63
    # train: (10+5)·2 + (10+10)·2 = 30 + 40 = 70; total 133
    assert ledger.by_use == {"prefill": 40, "decode": 20, "observation": 1, "verify": 2, "train": 70, "reuse": 0, "probe": 0}
    assert (ledger.rollout_tokens, ledger.total_tokens) == (63, 133)
    # by fate (rollout tokens): trained 15 + 20 = 35, zero_signal 14 + 14 = 28
    assert ledger.by_fate == {"trained": 35, "zero_signal": 28, "dropped_price": 0, "dropped_stale": 0}
    assert ledger.wasted_tokens == 28
    # hindsight gap: group b carried no signal: 28 rollout + 0 train
    assert ledger.hindsight_gap == 28 and ledger.zero_signal_groups == 1 and ledger.groups == 2
    m = ledger.metrics(target=0.5)
    assert m["ledger/reward_per_mtok"] == 1.0 / 133 * 1e6  # 7518.8 reward per million tokens
    assert m["ledger/wasted_fraction"] == 28 / 63
    assert m["ledger/hindsight_gap_fraction"] == 28 / 133
    assert m["ledger/prompts_skipped"] == 3
    assert math.isnan(m["ledger/tokens_to_target"])
    # hindsight bound: only group a sampled (35 rollout tokens) and trained twice (70): 105; the run spent 133
    assert ledger.hindsight_bound == 105 and m["ledger/hindsight_bound_tokens"] == 105
    assert m["ledger/tokens_over_hindsight"] == 133 / 105


def test_targets_absolute_and_relative_to_the_start():
    ledger = Ledger()
    for step, reward, tokens in ((0, 0.30, 0), (5, 0.33, 1000), (10, 0.36, 2000), (15, 0.41, 3000)):
        ledger.by_use["decode"] = tokens  # the total the next eval records
        ledger.record_eval(step, reward)
    assert ledger.tokens_to_target(0.35) == 2000 and ledger.tokens_to_target(0.5) is None
    assert ledger.tokens_to_delta(0.05) == 2000  # 0.30 + 0.05: first reached at 0.36
    assert ledger.tokens_to_delta(0.11) == 3000 and ledger.tokens_to_delta(0.2) is None
    m = ledger.metrics(target=0.4, delta=0.05)
    assert (m["ledger/tokens_to_target"], m["ledger/tokens_to_target_delta"]) == (3000, 2000)
    assert "ledger/tokens_to_target_delta" not in ledger.metrics(target=0.4)


def test_hindsight_counts_training_on_flat_groups():
    ledger = Ledger()
    trajs, _ = _step()
    ledger.record_step(TrajectoryColumns.of(trajs), TrajectoryPrices.of([TrajectoryDecision("trained")] * 4),
                       num_iterations=1)  # policy `none`
    # group b: rollout 28 + train 14 + 14 = 56
    assert ledger.hindsight_gap == 56 and ledger.wasted_tokens == 0


def test_tokens_to_target_and_eval_gain():
    ledger = Ledger()
    trajs, decs = _step()
    ledger.record_eval(0, 0.1)  # at 0 tokens
    ledger.record_step(TrajectoryColumns.of(trajs), TrajectoryPrices.of(decs), num_iterations=2)
    ledger.record_eval(1, 0.4)  # at 133
    ledger.record_step(TrajectoryColumns.of(trajs), TrajectoryPrices.of(decs), num_iterations=2)
    ledger.record_eval(2, 0.6)  # at 266
    assert ledger.tokens_to_target(0.5) == 266
    assert ledger.tokens_to_target(0.4) == 133
    assert ledger.tokens_to_target(0.9) is None
    # (0.6 − 0.1)/(266 − 0)·1e6 = 1879.7 reward per million tokens
    assert ledger.eval_gain_per_mtok() == (0.6 - 0.1) / 266 * 1e6
    s = ledger.summary(target=0.5)
    assert s["tokens_to_target"] == 266 and s["eval_history"][1] == {"step": 1, "reward": 0.4, "tokens": 133}
    assert ledger.summary(target=0.9)["tokens_to_target"] is None
    json.dumps(s)


def test_empty_ledger():
    ledger = Ledger()
    ledger.record_step(TrajectoryColumns.of([]), TrajectoryPrices.of([]), num_iterations=1)
    m = ledger.metrics()
    assert m["ledger/tokens_total"] == 0 and math.isnan(m["ledger/reward_per_mtok"])
    assert math.isnan(m["ledger/tokens_to_target"])
    assert ledger.summary()["reward_per_mtok"] is None


def test_ledger_round_trip():
    ledger = Ledger()
    trajs, decs = _step()
    ledger.record_step(TrajectoryColumns.of(trajs), TrajectoryPrices.of(decs), num_iterations=1, prompts_skipped=2)
    ledger.record_eval(1, 0.3)
    restored = Ledger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored == ledger
    # a checkpoint written before the extra fields existed still loads
    old = {k: ledger.state_dict()[k] for k in ("by_use", "by_fate", "trajectories_by_fate", "prompts_skipped")}
    assert Ledger.from_state_dict(old).total_tokens == ledger.total_tokens


def test_step_metrics_by_hand():
    trajs, _ = _step()
    decs = [TrajectoryDecision("trained", gain=0.3, cost=0.01, risk=0.05, price=0.24),
            TrajectoryDecision("trained", gain=0.1, cost=0.01, risk=0.05, price=0.04),
            TrajectoryDecision("zero_signal", cost=0.01, price=-0.01),
            TrajectoryDecision("zero_signal", cost=0.01, price=-0.01)]
    plan = [PromptDecision("a", 2, gain=0.2, cost=0.05, price=0.15, informative=0.5, tokens=60),
            PromptDecision("b", 2, gain=0.1, cost=0.05, price=0.05, informative=0.3, tokens=60),
            PromptDecision("c", 0, price=-0.02)]
    m = step_metrics(PromptPlan.of(plan), TrajectoryPrices.of(decs), TrajectoryColumns.of(trajs),
                     BudgetState(kappa_scale=2.0, drift=0.01))
    assert m["budget/prompts_sampled"] == 2 and m["budget/prompts_skipped"] == 1 and m["budget/samples_planned"] == 4
    assert m["budget/prompt_price_mean"] == pytest.approx((0.15 + 0.05) / 2)
    assert m["budget/prompt_informative_pred"] == pytest.approx(0.4) and m["budget/groups_informative_fraction"] == 0.5
    assert m["budget/admitted_fraction"] == 0.5 and m["budget/fraction_zero_signal"] == 0.5
    assert m["budget/price_mean"] == pytest.approx((0.24 + 0.04 - 0.02) / 4)  # 0.065
    assert m["budget/risk_mean"] == pytest.approx((0.05 + 0.05) / 4) and m["budget/kappa_scale"] == 2.0 and m["budget/drift"] == 0.01
    assert price_histograms(TrajectoryPrices.of(decs))["price"].tolist() == [0.24, 0.04, -0.01, -0.01]


@st.composite
def records(draw):
    trajs, decs = [], []
    for g in range(draw(st.integers(0, 5))):
        for _ in range(draw(st.integers(1, 6))):
            n_obs = draw(st.integers(0, 6))
            trajs.append(traj(f"g{g}", draw(st.sampled_from([0.0, 0.5, 1.0])), draw(st.integers(0, 20)),
                              draw(st.integers(0, 20)), n_obs, draw(st.integers(0, n_obs))))
            decs.append(TrajectoryDecision(draw(st.sampled_from(FATES))))
    return trajs, decs


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(records(), max_size=4), iters=st.integers(1, 3))
def test_ledger_totals_equal_sums_over_trajectories(steps, iters):
    ledger = Ledger()
    for trajs, decs in steps:
        ledger.record_step(TrajectoryColumns.of(trajs), TrajectoryPrices.of(decs), num_iterations=iters)
    all_t = [t for trajs, _ in steps for t in trajs]
    all_d = [d for _, decs in steps for d in decs]
    rollout = sum(t.tokens_prompt + t.tokens_completion for t in all_t)
    train = sum((t.tokens_prompt + t.tokens_completion) * iters for t, d in zip(all_t, all_d, strict=True) if d.trained)
    assert ledger.rollout_tokens == rollout == sum(ledger.by_fate.values())
    assert ledger.by_use["train"] == train and ledger.total_tokens == rollout + train
    assert sum(ledger.by_use[u] for u in USES) == ledger.total_tokens
    assert ledger.trajectories == len(all_t)
    for fate in FATES:
        assert ledger.by_fate[fate] == sum(t.tokens_prompt + t.tokens_completion for t, d in zip(all_t, all_d, strict=True)
                                           if d.fate == fate)
    assert ledger.wasted_tokens == sum(t.tokens_prompt + t.tokens_completion for t, d in zip(all_t, all_d, strict=True) if not d.trained)
    assert 0 <= ledger.hindsight_gap <= ledger.total_tokens
