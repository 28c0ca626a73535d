"""The allocation policies, one file each, and the three pure calls every policy goes through:

    plan = plan_prompts(cfg, state, candidates, step, rng, limits)                    # before rollout
    prices = price_trajectories(cfg, state, columns, current_version)                # after rollout
    update_state(cfg, state, columns, step, current_version, drift_kl, prices=prices)  # fold the evidence in

A new policy is one file (its config class, planner, fate rule: a `Policy` record) plus its entry in POLICIES.
The trainer drives these through budget.allocator.Budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies import marginal, max_var, none, prior, zero_var
from marginal_rl.budget.policies.base import Policy, SampleLimits, price_components, trajectory_arrays
from marginal_rl.budget.records import PromptPlan, TrajectoryPrices
from marginal_rl.budget.state import BudgetState, fold_evidence
from marginal_rl.rollout.types import TrajectoryColumns

POLICIES: dict[str, Policy] = {p.name: p for p in (none.POLICY, zero_var.POLICY, max_var.POLICY, prior.POLICY,
                                                  marginal.POLICY)}


def budget_config(policy: str = "zero_var", **keys) -> BudgetConfig:
    """The config of `policy` with `keys` set (the rest at their defaults)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {list(POLICIES)}, got {policy!r}")
    return POLICIES[policy].config(**keys)


def candidate_count(cfg: BudgetConfig, limits: SampleLimits) -> int:
    """How many candidates the policy is offered per step: `pool_factor` × prompts_per_step for a policy that chooses
    (prior, marginal); prompts_per_step for the uniform ones, which sample every prompt they are offered."""
    return limits.prompts_per_step * (cfg.pool_factor if POLICIES[cfg.policy].chooses else 1)


def plan_prompts(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                 rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """Before rollout: how many samples each candidate prompt gets (0 = skipped before rollout).

    `candidates` is a shuffled pool of prompt ids, `candidate_count` long; it returns one entry per candidate, in the
    same order."""
    return POLICIES[cfg.policy].plan(cfg, state, candidates, step, rng, limits)


def price_trajectories(cfg: BudgetConfig, state: BudgetState, columns: TrajectoryColumns, current_version: int, *,
                       num_iterations: int = 1, drift: float | None = None) -> TrajectoryPrices:
    """After rollout: price every trajectory and give it a fate (see FATES). Every policy records the same price
    components; the policy's rule sets the fate. `num_iterations`: training epochs, which multiply update tokens;
    `drift`: the δ that depreciates staleness (default: the state's measured drift, budget.state.current_drift)."""
    arrays = trajectory_arrays(columns, current_version, num_iterations)
    comp = price_components(cfg, state, arrays, drift)
    return TrajectoryPrices(POLICIES[cfg.policy].fates(cfg, arrays, comp), comp.gain, comp.cost, comp.risk,
                            comp.price, comp.advantage, arrays.staleness.astype(np.int64), comp.depreciation,
                            comp.risk_variance, comp.risk_staleness)


def update_state(cfg: BudgetConfig, state: BudgetState, columns: TrajectoryColumns, step: int, current_version: int,
                 drift_kl: float | None = None, *, prices: TrajectoryPrices | None = None,
                 num_iterations: int = 1, reuse_tokens: float = 0.0, probe_tokens: float = 0.0) -> None:
    """After the step: fold its evidence into the state (budget.state.fold_evidence; without `prices` every
    trajectory counts as trained; `reuse_tokens`: update tokens of reused trajectories, `probe_tokens`: the
    likelihood probe's, spent too), then run the policy's controller, if it has one."""
    trained = np.ones(len(columns), dtype=bool) if prices is None else prices.trained
    fold_evidence(cfg, state, columns, trained, step, current_version, drift_kl, num_iterations, reuse_tokens,
                  probe_tokens)
    control = POLICIES[cfg.policy].control
    if control is not None:
        control(cfg, state)
