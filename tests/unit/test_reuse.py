"""Priced reuse (budget/reuse.py, `budget.reuse_buffer`), checked by hand: a reused trajectory's price, the step it
leaves the buffer, the buffer's bounds, the ledger's `reuse` use, the spend and the planner's reserve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from marginal_rl.budget.allocator import Budget, Update
from marginal_rl.budget.policies import SampleLimits, budget_config, marginal
from marginal_rl.budget.policies.marginal import planner_limits
from marginal_rl.budget.records import TrajectoryDecision, TrajectoryPrices
from marginal_rl.budget.reuse import Reuse, ReuseBuffer
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns

LIMITS = SampleLimits(prompts_per_step=4, group_size=2, min_group_size=2, max_group_size=4)


def traj(name: str, group: str, reward: float, step: int = 0, version: int = 0, prompt: int = 10,
         completion: int = 10) -> Trajectory:
    return Trajectory(name, f"p-{group}", group, step, version, [0] * prompt, [0] * completion, [1] * completion,
                      [0.0] * completion, reward, "eos")


def flat_group(step: int) -> list[Trajectory]:
    """A group whose rewards are equal: zero signal, never trained on, never kept."""
    return [traj(f"z{step}-{k}", f"z{step}", 1.0, step, step) for k in range(2)]


def settle(budget: Budget, trajectories: list[Trajectory], step: int, version: int, seen: list | None = None):
    plan = budget.plan(["p-a"], step, np.random.default_rng(step))

    def update(prices, reuse):
        if seen is not None:
            seen.append(reuse)
        return Update(version + 1, None)  # no drift measured: δ stays at drift_prior

    return budget.settle(plan, TrajectoryColumns.of(trajectories), step, version, update, trajectories)


def test_a_reused_trajectory_is_priced_by_hand_and_leaves_when_its_price_turns_negative():
    # A group of 2 with rewards 0 and 1, 20 tokens each (10 prompt + 10 completion), fixed prices (no token budget):
    #   G = V·4σ̂²·n/(n + n0) = 1·4·0.25·2/10 = 0.2;  g⁰ = 0.1 each (|A| = 1 for both)
    #   D(Δv) = exp(−δΔv/s) = exp(−0.01·Δv/0.1) = exp(−0.1·Δv)
    #   cost = κ_u·20 = 5e-4·20 = 0.01 (update tokens only: the rollout tokens are sunk)
    #   risk = ρ·(g⁰·min(1, 1/(√2·1)) + g⁰·(1 − D)) = 0.25·(0.1/√2 + 0.1·(1 − D))
    #   price = 0.1·D − 0.01 − risk = 0.125·D − (0.01 + 0.025/√2 + 0.025) > 0  iff  Δv < −10·ln(0.42142) = 8.64
    cfg = budget_config("marginal", reuse_buffer=8)
    budget, offers = Budget(cfg, LIMITS), []
    first = settle(budget, [traj("a0", "a", 0.0), traj("a1", "a", 1.0)], 0, 0, offers)
    assert first.prices.fates == ["trained", "trained"] and offers == [None]  # nothing to reuse at step 0
    assert len(budget.buffer) == 2 and budget.buffer.uses == [1, 1]
    fates = []
    for step in range(1, 11):
        settled = settle(budget, flat_group(step), step, step, offers)
        reuse = offers[-1]
        if reuse is None:
            fates.append(None)
            continue
        d = math.exp(-0.1 * step)
        assert reuse.prices.staleness.tolist() == [step, step]
        assert reuse.prices.gain == pytest.approx([0.1 * d] * 2)
        assert reuse.prices.cost == pytest.approx([0.01] * 2)
        assert reuse.prices.risk == pytest.approx([0.25 * (0.1 / math.sqrt(2) + 0.1 * (1 - d))] * 2)
        assert reuse.prices.price == pytest.approx([0.125 * d - (0.01 + 0.025 / math.sqrt(2) + 0.025)] * 2)
        assert settled.reuse is reuse
        fates.append(reuse.prices.fates[0])
    # trained again at Δv = 1..8; at Δv = 9 its price is negative only because of staleness; then the buffer is empty
    assert fates == ["trained"] * 8 + ["dropped_stale", None]
    assert budget.ledger.reused == 16 and budget.ledger.by_use["reuse"] == 16 * 20
    # its rollout tokens were counted once, at step 0; the flat groups' 40 tokens a step are rollout only
    assert budget.ledger.by_use["prefill"] == 20 + 10 * 20 and budget.ledger.by_use["train"] == 2 * 20
    assert budget.ledger.total_tokens == 2 * 20 + 2 * 20 + 10 * 40 + 16 * 20
    assert budget.ledger.metrics()["ledger/trajectories_reused"] == 16


def test_reuse_is_part_of_the_spend_the_controller_sees():
    budget = Budget(budget_config("marginal", reuse_buffer=8, token_budget=1000), LIMITS)
    settle(budget, [traj("a0", "a", 0.0), traj("a1", "a", 1.0)], 0, 0)
    assert budget.state.last_spend == 40 + 40  # rollout + training of the new group
    settled = settle(budget, flat_group(1), 1, 1)
    assert settled.metrics["budget/reuse_trained"] == 2 and settled.metrics["budget/reuse_tokens"] == 40
    assert budget.state.last_spend == 40 + 40  # the flat group's rollout + the reused pair's update tokens


def test_the_planner_reserves_the_update_tokens_of_the_reuse_it_will_buy(monkeypatch):
    cfg = budget_config("marginal", token_budget=1000, budget_slack=1.5)
    assert planner_limits(cfg, LIMITS) == (12.0, 1500.0)
    assert planner_limits(cfg, SampleLimits(4, 2, 2, 4, reserved_tokens=320.0)) == (12.0, 1180.0)
    assert planner_limits(cfg, SampleLimits(4, 2, 2, 4, reserved_tokens=2000.0))[1] == 0.0
    # through the Budget: the reserve is the update tokens of the buffer's trajectories priced positive now
    budget = Budget(budget_config("marginal", reuse_buffer=8, token_budget=1000), LIMITS)
    settle(budget, [traj("a0", "a", 0.0), traj("a1", "a", 1.0)], 0, 0)
    reserved = []
    monkeypatch.setattr(marginal, "planner_limits",
                        lambda cfg, limits, credit=0.0: reserved.append(limits.reserved_tokens) or
                        planner_limits(cfg, limits, credit))
    budget.plan([f"p{i}" for i in range(16)], 1, np.random.default_rng(0))
    assert reserved == [40.0]


def _prices(fates: list[str], price: list[float]) -> TrajectoryPrices:
    return TrajectoryPrices.of([TrajectoryDecision(f, price=p) for f, p in zip(fates, price, strict=True)])


def test_refill_keeps_what_trained_adds_the_new_and_drops_the_lowest_priced_over_capacity():
    old = [traj("o0", "o", 0.0), traj("o1", "o", 1.0)]
    buffer = ReuseBuffer(3, list(old), [1, 2])
    offered = Reuse(old, TrajectoryColumns.of(old), _prices(["trained", "dropped_stale"], [0.2, -0.1]),
                    np.array([1, 2]))
    new = [traj(f"n{k}", "n", float(k % 2), 1, 1) for k in range(4)]
    counts = buffer.refill(offered, new, _prices(["trained", "trained", "dropped_price", "trained"],
                                                 [0.5, 0.1, -0.3, 0.3]))
    # kept: o0 (0.2, one more use); candidates n0 0.5, n1 0.1, n3 0.3 (n2 was not trained on); over by 1: n1 leaves
    assert [t.traj_id for t in buffer.trajectories] == ["o0", "n0", "n3"] and buffer.uses == [2, 1, 1]
    assert counts == {"kept": 1, "dropped": 1, "added": 3, "dropped_capacity": 1}
    assert buffer.columns().reward.tolist() == [0.0, 0.0, 1.0]  # the columns follow the refill
    # given the step's columns, the refill takes the buffer's from the offer's and the step's rows: the same columns
    taken = ReuseBuffer(3, list(old), [1, 2])
    taken.refill(offered, new, _prices(["trained", "trained", "dropped_price", "trained"], [0.5, 0.1, -0.3, 0.3]),
                 TrajectoryColumns.of(new))
    read = TrajectoryColumns.of(taken.trajectories)
    assert taken.trajectories == buffer.trajectories and taken.columns() is not None
    for name in ("reward", "group", "tokens_rollout", "tokens_policy", "behavior_version"):
        assert getattr(taken.columns(), name).tolist() == getattr(read, name).tolist()
    assert taken.columns().group_ids == read.group_ids == ["o", "n"]


def test_the_buffer_survives_a_checkpoint_and_a_resume_may_shrink_it():
    budget = Budget(budget_config("marginal", reuse_buffer=8), LIMITS)
    settle(budget, [traj("a0", "a", 0.0), traj("a1", "a", 1.0)], 0, 0)
    settle(budget, [traj("b0", "b", 1.0, 1, 1), traj("b1", "b", 0.0, 1, 1)], 1, 1)
    saved = json.loads(json.dumps(budget.state_dict()))  # the checkpoint's state.json
    again = Budget(budget_config("marginal", reuse_buffer=8), LIMITS)
    again.load_state_dict(saved)
    assert again.buffer.trajectories == budget.buffer.trajectories and again.buffer.uses == [2, 2, 1, 1]
    assert again.ledger.by_use == budget.ledger.by_use and again.ledger.reused == 2
    smaller = Budget(budget_config("marginal", reuse_buffer=2), LIMITS)
    smaller.load_state_dict(saved)
    assert [t.traj_id for t in smaller.buffer.trajectories] == ["b0", "b1"]


def test_settle_with_reuse_needs_the_trajectory_records():
    budget = Budget(budget_config("marginal", reuse_buffer=8), LIMITS)
    plan = budget.plan(["p-a"], 0, np.random.default_rng(0))
    cols = TrajectoryColumns.of([traj("a0", "a", 0.0), traj("a1", "a", 1.0)])
    with pytest.raises(ValueError, match="reuse_buffer keeps trajectories"):
        budget.settle(plan, cols, 0, 0, lambda prices, reuse: Update(1, None))


def test_reuse_buffer_is_a_marginal_key_and_must_be_non_negative():
    with pytest.raises(ValueError, match="reuse_buffer: expected an integer >= 0"):
        budget_config("marginal", reuse_buffer=-1)
    with pytest.raises(TypeError):
        budget_config("zero_var", reuse_buffer=8)
