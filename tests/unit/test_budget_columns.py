"""Columnar records: TrajectoryColumns by hand, and the columnar results (PromptPlan, TrajectoryPrices) against
their per-object view; columns rebuilt from that view give every budget call the same answer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from marginal_rl.budget.ledger import Ledger
from marginal_rl.budget.metrics import price_histograms, step_metrics
from marginal_rl.budget.policies import (
    POLICIES,
    SampleLimits,
    budget_config,
    plan_prompts,
    price_trajectories,
    update_state,
)
from marginal_rl.budget.records import PromptDecision, PromptPlan, TrajectoryDecision, TrajectoryPrices
from marginal_rl.budget.state import BudgetState
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns


def traj(group: str, prompt: str, reward: float, n_prompt: int, mask: list[int], *, version: int = 0,
         n_verify: int = 0) -> Trajectory:
    return Trajectory(traj_id=f"{group}-{reward}-{len(mask)}", prompt_id=prompt, group_id=group, step=0,
                      behavior_version=version, prompt_ids=[3] * n_prompt, completion_ids=[4] * len(mask),
                      completion_mask=mask, behavior_logprobs=[0.0] * len(mask), reward=reward, finish_reason="eos",
                      tokens_verify=n_verify)


def _step() -> list[Trajectory]:
    # group a (prompt pa): single-turn, 10 + 5 and 10 + 3 tokens; group b (prompt pb): an agent episode of 12 prompt
    # tokens and 10 completion tokens, of which 7 are the policy's (two turns) and 3 an observation, 2 of them
    # verification; a again after b: group ids are dense in first-seen order, not sorted
    return [traj("a", "pa", 1.0, 10, [1] * 5, version=3),
            traj("b", "pb", 0.5, 12, [1, 1, 1, 0, 0, 0, 1, 1, 1, 1], version=2, n_verify=2),
            traj("a", "pa", 0.0, 10, [1] * 3, version=4)]


def test_trajectory_columns_by_hand():
    trajs = _step()
    cols = TrajectoryColumns.of(trajs)
    assert len(cols) == 3 and cols.num_groups == 2
    assert cols.reward.tolist() == [1.0, 0.5, 0.0]
    assert cols.group.tolist() == [0, 1, 0] and cols.group_ids == ["a", "b"] and cols.group_prompt_ids == ["pa", "pb"]
    assert cols.tokens_prompt.tolist() == [10, 12, 10]
    assert cols.tokens_completion.tolist() == [5, 10, 3]
    assert cols.tokens_policy.tolist() == [5, 7, 3]  # the agent's 3 observation tokens are not the policy's
    assert cols.tokens_verify.tolist() == [0, 2, 0]
    assert cols.behavior_version.tolist() == [3, 2, 4]
    assert cols.tokens_rollout.tolist() == [15, 22, 13]  # prompt + completion: 10+5, 12+10, 10+3
    # the same numbers as the records' own properties
    assert cols.tokens_policy.tolist() == [t.tokens_policy for t in trajs]
    assert (cols.tokens_completion - cols.tokens_policy).tolist() == [t.tokens_observation for t in trajs]
    with pytest.raises(ValueError):
        cols.reward[0] = 2.0  # read-only: built once per step, read by every consumer
    empty = TrajectoryColumns.of([])
    assert len(empty) == 0 and empty.num_groups == 0 and empty.group.dtype == np.int64


def _random_step(rng: np.random.Generator) -> list[Trajectory]:
    trajs = []
    for g in range(6):
        n, version = int(rng.integers(1, 7)), int(rng.integers(0, 3))
        rewards = rng.choice([0.0, 1.0], n) if g % 2 else np.round(rng.random(n), 2)
        for r in rewards:
            obs = int(rng.integers(0, 4)) if g == 5 else 0
            mask = [1] * int(rng.integers(0, 9)) + [0] * obs
            trajs.append(traj(f"g{g}", f"p{g % 4}", float(r), int(rng.integers(3, 12)), mask, version=version,
                              n_verify=int(rng.integers(0, obs + 1))))
    return [trajs[i] for i in rng.permutation(len(trajs))]


@pytest.mark.parametrize("policy", POLICIES)
def test_trajectory_prices_equal_their_per_object_view(policy):
    trajs = _random_step(np.random.default_rng(1))
    prices = price_trajectories(budget_config(policy), BudgetState(), TrajectoryColumns.of(trajs), 3)
    decisions = list(prices)
    assert len(prices) == len(decisions) == len(trajs)
    for i, d in enumerate(decisions):
        assert isinstance(d, TrajectoryDecision) and d == prices[i]
        assert d == TrajectoryDecision(prices.fates[i], float(prices.gain[i]), float(prices.cost[i]),
                                       float(prices.risk[i]), float(prices.price[i]), float(prices.advantage[i]),
                                       int(prices.staleness[i]), float(prices.depreciation[i]),
                                       float(prices.risk_variance[i]), float(prices.risk_staleness[i]))
    assert prices[-1] == decisions[-1]
    with pytest.raises(IndexError):
        prices[len(prices)]
    assert prices.trained.tolist() == [d.trained for d in decisions]
    assert prices.staleness.tolist() == [3 - t.behavior_version for t in trajs]
    # and back: the per-object view rebuilds the same columns
    rebuilt = TrajectoryPrices.of(decisions)
    assert list(rebuilt) == decisions and rebuilt.fate_code.tolist() == prices.fate_code.tolist()
    assert not prices.price.flags.writeable


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_plan_equals_its_per_object_view(policy):
    cfg = budget_config(policy, **({"token_budget": 300} if policy == "marginal" else {}))
    state = BudgetState()
    update_state(cfg, state, TrajectoryColumns.of(_random_step(np.random.default_rng(2))), step=0, current_version=1)
    cands = [f"p{i}" for i in range(10)]
    plan = plan_prompts(cfg, state, cands, 1, np.random.default_rng(0), SampleLimits(3, 4, 2, 6))
    decisions = list(plan)
    assert [d.prompt_id for d in decisions] == plan.prompt_ids == cands
    for i, d in enumerate(decisions):
        assert isinstance(d, PromptDecision) and d == plan[i]
        assert d == PromptDecision(plan.prompt_ids[i], int(plan.samples[i]), float(plan.pass_rate[i]),
                                   float(plan.gain[i]), float(plan.cost[i]), float(plan.price[i]), float(plan.risk[i]),
                                   float(plan.sampled_rate[i]), float(plan.informative[i]), float(plan.tokens[i]),
                                   plan.reasons[i])
        assert (d.reason == "") == (d.samples > 0)  # a reason for every skipped prompt, none for a sampled one
    assert list(PromptPlan.of(decisions)) == decisions


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                                        zip(a.values(), b.values(), strict=True))


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_calls_agree_on_columns_rebuilt_from_rows(policy):
    cfg = budget_config(policy, **({"token_budget": 200} if policy == "marginal" else {}))
    trajs = _random_step(np.random.default_rng(3))
    cols = TrajectoryColumns.of(trajs)
    state = BudgetState()
    prices = price_trajectories(cfg, state, cols, 2, num_iterations=2)
    rebuilt = TrajectoryPrices.of(list(prices))
    assert list(prices) == list(price_trajectories(cfg, state, TrajectoryColumns.of(list(trajs)), 2, num_iterations=2))
    by_rows, by_columns = copy.deepcopy(state), copy.deepcopy(state)
    update_state(cfg, by_rows, cols, 0, 2, 0.01, prices=rebuilt, num_iterations=2)
    update_state(cfg, by_columns, cols, 0, 2, 0.01, prices=prices, num_iterations=2)
    assert by_rows == by_columns
    ledgers = Ledger(), Ledger()
    ledgers[0].record_step(cols, rebuilt, 2, prompts_skipped=1)
    ledgers[1].record_step(cols, prices, 2, prompts_skipped=1)
    assert ledgers[0] == ledgers[1]
    plan = [PromptDecision("p0", 3, gain=0.2, tokens=40.0), PromptDecision("p1", 0, price=-0.1)]
    assert _same(step_metrics(PromptPlan.of(plan), rebuilt, cols, by_rows, cfg=cfg),
                 step_metrics(PromptPlan.of(list(PromptPlan.of(plan))), prices, cols, by_columns, cfg=cfg))
    assert {k: v.tolist() for k, v in price_histograms(rebuilt).items()} == \
        {k: v.tolist() for k, v in price_histograms(prices).items()}


def test_mismatched_lengths_are_refused():
    cols = TrajectoryColumns.of(_step())
    with pytest.raises(ValueError, match="2 decisions for 3 trajectories"):
        Ledger().record_step(cols, TrajectoryPrices.of([TrajectoryDecision("trained")] * 2), 1)
    with pytest.raises(ValueError, match="2 decisions for 3 trajectories"):
        update_state(budget_config(), BudgetState(), cols, 0, 0,
                     prices=TrajectoryPrices.of([TrajectoryDecision("trained")] * 2))


def _same_columns(a: TrajectoryColumns, b: TrajectoryColumns) -> None:
    assert a.group_ids == b.group_ids and a.group_prompt_ids == b.group_prompt_ids
    for name in ("reward", "group", "tokens_prompt", "tokens_completion", "tokens_policy", "tokens_verify",
                 "behavior_version", "group_size", "group_flat", "tokens_rollout"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.tolist() == y.tolist() and not x.flags.writeable, name


def test_taken_rows_are_the_columns_of_their_trajectories():
    # rows of two or three steps' columns, in any order and with repeats, groups split across the parts and a group
    # id that two parts share: take must give what `of` gives for the same trajectories
    rng = np.random.default_rng(0)
    for _ in range(50):
        steps = []
        for s in range(int(rng.integers(1, 4))):
            groups = [f"g{s}-{k}" for k in range(int(rng.integers(1, 5)))] + ["shared"]  # "shared": in every step
            steps.append([traj(g, "p" + g, float(rng.random() < 0.5), int(rng.integers(1, 9)),
                               [int(m) for m in rng.integers(0, 2, int(rng.integers(0, 6)))],
                               version=int(rng.integers(0, 4)), n_verify=int(rng.integers(0, 3)))
                          for g in rng.choice(groups, size=int(rng.integers(0, 9)))])
        parts = [(records, rng.integers(0, len(records), int(rng.integers(0, 7))) if records else
                  np.zeros(0, dtype=np.int64)) for records in steps]
        taken = TrajectoryColumns.take([(TrajectoryColumns.of(records), rows) for records, rows in parts])
        _same_columns(taken, TrajectoryColumns.of([records[i] for records, rows in parts for i in rows.tolist()]))
    _same_columns(TrajectoryColumns.take([]), TrajectoryColumns.of([]))
