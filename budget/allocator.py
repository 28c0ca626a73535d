"""The budget as one component: two calls per training step.

    budget = Budget(cfg.budget, limits, num_iterations)
    plan = budget.plan(candidates, step, rng)                      # before rollout: samples per candidate prompt
    settled = budget.settle(plan, columns, step, version, update)  # after it: prices, fates, the update, evidence

`settle` prices every trajectory and gives it a fate, hands the prices to `update` (the trainer's step on the
admitted trajectories, which returns the new policy version and the drift it measured), then folds the step's
evidence into the state (posteriors, token lengths, drift, the price controller), records every token in the
ledger and computes the step's `budget/...` metrics. The update runs inside settle because the fold needs what
only the update can measure (how far the policy moved) and the update needs the fates.
Pure apart from its own state: no I/O, no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.ledger import Ledger
from marginal_rl.budget.metrics import price_histograms, step_metrics
from marginal_rl.budget.policies import (
    SampleLimits,
    candidate_count,
    plan_prompts,
    price_trajectories,
    update_state,
)
from marginal_rl.budget.records import PromptPlan, TrajectoryPrices
from marginal_rl.budget.state import BudgetState
from marginal_rl.rollout.types import TrajectoryColumns


@dataclass(frozen=True)
class Update:
    """What the trainer's update reports back to the budget."""

    version: int  # policy version after the update
    drift_kl: float | None  # measured per-version drift (None: not measured)


@dataclass(frozen=True)
class Settlement:
    prices: TrajectoryPrices  # every trajectory's price components and fate
    update: Update  # what the update returned
    metrics: dict[str, float]  # the step's budget/... scalars (after the fold: the values the next step uses)
    histograms: dict[str, np.ndarray]  # budget/hist_<component>: each price component over the step's trajectories


class Budget:
    """Plans, prices, remembers and ledgers. `seconds` accumulates the time spent in the budget's own code (not in
    the update it calls), for perf/budget_seconds; the caller reads and resets it."""

    def __init__(self, cfg: BudgetConfig, limits: SampleLimits, num_iterations: int = 1,
                 families: dict[str, str] | None = None):
        """`families`: prompt id -> task family, for the pooled evidence (prompts without one are not pooled)."""
        self.cfg, self.limits, self.num_iterations = cfg, limits, num_iterations
        self.families = dict(families or {})
        self.state, self.ledger = BudgetState(family_of=self.families), Ledger()
        self.seconds = 0.0

    @property
    def candidates_per_step(self) -> int:
        """Candidate prompts the policy is offered per step (budget.policies.candidate_count)."""
        return candidate_count(self.cfg, self.limits)

    def plan(self, candidates: Sequence[str], step: int, rng: np.random.Generator) -> PromptPlan:
        t0 = time.perf_counter()
        plan = plan_prompts(self.cfg, self.state, candidates, step, rng, self.limits)
        self.seconds += time.perf_counter() - t0
        return plan

    def settle(self, plan: PromptPlan, columns: TrajectoryColumns, step: int, version: int,
               update: Callable[[TrajectoryPrices], Update]) -> Settlement:
        t0 = time.perf_counter()
        prices = price_trajectories(self.cfg, self.state, columns, version, num_iterations=self.num_iterations)
        t1 = time.perf_counter()
        done = update(prices)
        t2 = time.perf_counter()
        update_state(self.cfg, self.state, columns, step, done.version, done.drift_kl, prices=prices,
                     num_iterations=self.num_iterations)
        self.ledger.record_step(columns, prices, self.num_iterations, prompts_skipped=int((plan.samples == 0).sum()))
        metrics = step_metrics(plan, prices, columns, self.state, cfg=self.cfg)
        histograms = {f"budget/hist_{k}": v for k, v in price_histograms(prices).items()}
        self.seconds += (t1 - t0) + (time.perf_counter() - t2)
        return Settlement(prices, done, metrics, histograms)

    def ledger_metrics(self) -> dict[str, float]:
        """The ledger's cumulative ledger/... scalars (tokens_to_target against budget.target_reward and, when set,
        the run's start + budget.target_delta)."""
        t0 = time.perf_counter()
        out = self.ledger.metrics(self.cfg.target_reward, self.cfg.target_delta or None)
        self.seconds += time.perf_counter() - t0
        return out

    def state_dict(self) -> dict:
        return {"budget": self.state.state_dict(), "ledger": self.ledger.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.state, self.ledger = BudgetState.from_state_dict(d["budget"]), Ledger.from_state_dict(d["ledger"])
        self.state.family_of = self.families
