"""The budget as one component: two calls per training step.

    budget = Budget(cfg.budget, limits, num_iterations)
    plan = budget.plan(candidates, step, rng, probe)               # before rollout: samples per candidate prompt
    settled = budget.settle(plan, columns, step, version, update, trajectories)  # after it: prices, fates, the
                                                                                 # update, evidence

`settle` prices every trajectory and gives it a fate, hands the prices to `update` (the trainer's step on the
admitted trajectories, which returns the new policy version and the drift it measured) together with the priced
reuse buffer's offer (budget/reuse.py; None when budget.reuse_buffer is off or the buffer is empty), then folds the
step's evidence into the state (posteriors, token lengths, drift, the price controller), records every token in the
ledger, refills the reuse buffer and computes the step's `budget/...` metrics. The update runs inside settle because the fold needs what
only the update can measure (how far the policy moved) and the update needs the fates.
Pure apart from its own state: no I/O, no torch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from marginal_rl.budget import kernels
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
from marginal_rl.budget.policies.marginal import Probe, plan_probing, plan_top_up
from marginal_rl.budget.records import PromptPlan, TrajectoryPrices
from marginal_rl.budget.reuse import Reuse, ReuseBuffer, reuse_metrics
from marginal_rl.budget.state import BudgetState, fold_reuse_drift, reuse_drift
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns


@dataclass(frozen=True)
class Update:
    """What the trainer's update reports back to the budget."""

    version: int  # policy version after the update
    drift_kl: float | None  # measured per-version drift (None: not measured)
    reuse_drift_kl: float | None = None  # ... on the reused trajectories trained on (None: none, or not measured)


@dataclass(frozen=True)
class Settlement:
    prices: TrajectoryPrices  # every trajectory's price components and fate
    update: Update  # what the update returned
    reuse: Reuse | None  # the reused trajectories offered to the step, priced (None: reuse off or buffer empty)
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
        capacity = getattr(cfg, "reuse_buffer", 0)
        self.buffer = ReuseBuffer(capacity) if capacity > 0 else None
        self._offered: tuple[tuple, Reuse] | None = None  # the last offer and what it was priced at
        self.seconds = 0.0
        if cfg.policy == "marginal":  # the policy the compiled kernels serve: compile them before the first step
            kernels.warm()

    @property
    def candidates_per_step(self) -> int:
        """Candidate prompts the policy is offered per step (budget.policies.candidate_count)."""
        return candidate_count(self.cfg, self.limits)

    def plan(self, candidates: Sequence[str], step: int, rng: np.random.Generator,
             probe: Probe | None = None) -> PromptPlan:
        """Samples per candidate. With priced reuse, the update tokens of the buffer's trajectories priced positive
        now are taken off the step's token cap first (they are bought at the same price as new samples).

        With the likelihood probe (budget.probe_strength > 0; `probe` is the trainer's: prompt ids -> (pass rates,
        tokens processed)), the candidates the plan samples whose evidence is weak are probed, their posteriors set
        from the probe, and the step planned again, up to probe_rounds times; the probe's tokens come off the
        step's token cap and are spent (the ledger's `probe` use)."""
        t0 = time.perf_counter()
        limits = self.limits
        offer = self.offer(self.state.version)
        if offer is not None:
            limits = dataclasses.replace(limits, reserved_tokens=offer.tokens(self.num_iterations))
        strength = getattr(self.cfg, "probe_strength", 0.0)
        if strength > 0:
            if probe is None:
                raise ValueError("plan: budget.probe_strength is set; pass the trainer's likelihood probe")
            plan, probe_s = plan_probing(self.cfg, self.state, candidates, step, rng, limits, probe)
            t0 += probe_s  # the probe's forward passes are the trainer's time, not the budget's
        else:
            plan = plan_prompts(self.cfg, self.state, candidates, step, rng, limits)
        self.seconds += time.perf_counter() - t0
        return plan

    def top_up(self, plan: PromptPlan, pilots: TrajectoryColumns, rng: np.random.Generator) -> PromptPlan:
        """Pilot then commit (budget.pilot_samples > 0): `plan`'s groups have drawn their pilots (`pilots`: every
        pilot trajectory of the step, grouped by prompt); the rest of each group is priced on what its pilot showed
        and the step's limits are handed out again (policies.marginal.plan_top_up). Returns the plan with the groups'
        final sizes; the trainer samples the difference."""
        t0 = time.perf_counter()
        index = dict(zip(plan.prompt_ids, range(len(plan)), strict=True))
        rows = np.array([index[pid] for pid in pilots.group_prompt_ids], dtype=np.int64)
        count = np.bincount(rows, weights=pilots.group_size, minlength=len(plan))
        total = np.bincount(rows, weights=np.bincount(pilots.group, weights=pilots.reward, minlength=pilots.num_groups),
                            minlength=len(plan))
        flat = np.zeros(len(plan), dtype=bool)
        flat[rows] = pilots.group_flat
        limits = self.limits
        offer = self.offer(self.state.version)
        if offer is not None:
            limits = dataclasses.replace(limits, reserved_tokens=offer.tokens(self.num_iterations))
        committed = float(pilots.tokens_rollout.sum()) + (
            plan.probe_tokens if getattr(self.cfg, "probe_charge", True) else 0.0)
        out = plan_top_up(self.cfg, self.state, plan, count.astype(np.int64), total, flat, rng, limits, committed)
        self.seconds += time.perf_counter() - t0
        return out

    def offer(self, version: int) -> Reuse | None:
        """The reuse buffer's trajectories priced at policy `version` (the marginal fate rule: `trained` = worth
        training on again); None when reuse is off or the buffer is empty."""
        if self.buffer is None or not len(self.buffer):
            return None
        columns, drift = self.buffer.columns(), reuse_drift(self.cfg, self.state)
        key = (id(columns), version, self.state.kappa_scale, drift)  # all a buffer's prices depend on
        if self._offered is None or self._offered[0] != key:  # the plan's offer is the settle's, unless either moved
            prices = price_trajectories(self.cfg, self.state, columns, version, num_iterations=self.num_iterations,
                                        drift=drift)
            self._offered = key, Reuse(list(self.buffer.trajectories), columns, prices,
                                       np.array(self.buffer.uses, dtype=np.int64))
        return self._offered[1]

    def settle(self, plan: PromptPlan, columns: TrajectoryColumns, step: int, version: int,
               update: Callable[[TrajectoryPrices, Reuse | None], Update],
               trajectories: Sequence[Trajectory] = ()) -> Settlement:
        """`trajectories`: the records behind `columns`, which the reuse buffer keeps (needed only with reuse on)."""
        t0 = time.perf_counter()
        if self.buffer is not None and len(trajectories) != len(columns):
            raise ValueError(f"settle: budget.reuse_buffer keeps trajectories; got {len(trajectories)} records for "
                             f"{len(columns)} columns")
        prices = price_trajectories(self.cfg, self.state, columns, version, num_iterations=self.num_iterations)
        reuse = self.offer(version)
        t1 = time.perf_counter()
        done = update(prices, reuse)
        t2 = time.perf_counter()
        reuse_tokens = reuse.tokens(self.num_iterations) if reuse is not None else 0.0
        reused = int(reuse.prices.trained.sum()) if reuse is not None else 0
        charged = plan.probe_tokens if getattr(self.cfg, "probe_charge", True) else 0  # the controller's spend
        update_state(self.cfg, self.state, columns, step, done.version, done.drift_kl, prices=prices,
                     num_iterations=self.num_iterations, reuse_tokens=reuse_tokens, probe_tokens=charged)
        fold_reuse_drift(self.cfg, self.state, done.reuse_drift_kl)
        self.ledger.record_step(columns, prices, self.num_iterations, prompts_skipped=int((plan.samples == 0).sum()),
                                reused=reused, reuse_tokens=int(reuse_tokens), probe_tokens=plan.probe_tokens,
                                probed=0 if plan.probed is None else int(plan.probed.sum()))
        metrics = step_metrics(plan, prices, columns, self.state, cfg=self.cfg)
        if self.buffer is not None:
            moved = self.buffer.refill(reuse, list(trajectories), prices, columns)
            metrics.update(reuse_metrics(reuse, moved, len(self.buffer), reuse_tokens,
                                         reuse_drift(self.cfg, self.state)))
        histograms = {f"budget/hist_{k}": v for k, v in price_histograms(prices).items()}
        self.seconds += (t1 - t0) + (time.perf_counter() - t2)
        return Settlement(prices, done, reuse, metrics, histograms)

    def ledger_metrics(self) -> dict[str, float]:
        """The ledger's cumulative ledger/... scalars (tokens_to_target against budget.target_reward and, when set,
        the run's start + budget.target_delta)."""
        t0 = time.perf_counter()
        out = self.ledger.metrics(self.cfg.target_reward, self.cfg.target_delta or None)
        self.seconds += time.perf_counter() - t0
        return out

    def state_dict(self) -> dict:
        d = {"budget": self.state.state_dict(), "ledger": self.ledger.state_dict()}
        if self.buffer is not None:
            d["reuse"] = self.buffer.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.state, self.ledger = BudgetState.from_state_dict(d["budget"]), Ledger.from_state_dict(d["ledger"])
        self.state.family_of = self.families
        if self.buffer is not None and "reuse" in d:  # under this run's capacity (a resume may change it)
            saved = ReuseBuffer.from_state_dict(d["reuse"])
            self.buffer = ReuseBuffer(self.buffer.capacity, saved.trajectories[-self.buffer.capacity:],
                                      saved.uses[-self.buffer.capacity:])
