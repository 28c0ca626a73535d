"""Allocation policies: which prompts get samples before rollout, which trajectories are trained on after it.

Every policy goes through the same two pure calls, so the trainer never changes when a policy does:

    plan = plan_prompts(cfg, state, candidates, step, rng, limits)                # before rollout
    decisions = price_trajectories(cfg, state, trajectories, current_version)    # after rollout

`state` (BudgetState) is the only memory; it is updated by `update_state` after each step and can be saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from budget.config import BudgetConfig
from rollout.types import Trajectory

FATES = ("trained", "zero_signal", "dropped_price", "dropped_stale")


@dataclass
class PromptDecision:
    """The pre-rollout price of one prompt and how many samples it gets (0 = skipped before rollout)."""

    prompt_id: str
    samples: int
    pass_rate: float = 0.0  # predicted pass rate (posterior mean)
    gain: float = 0.0  # expected learning gain of the allocated samples (V·ΔQ)
    cost: float = 0.0  # expected cost of the allocated samples (tokens × κ)
    price: float = 0.0  # gain − cost − risk


@dataclass
class TrajectoryDecision:
    """The post-rollout price of one trajectory and its fate. Zeros where a policy does not price a component."""

    fate: str
    gain: float = 0.0
    cost: float = 0.0
    risk: float = 0.0
    price: float = 0.0

    @property
    def trained(self) -> bool:
        return self.fate == "trained"


@dataclass
class BudgetState:
    """Everything the budget remembers between steps. Plain data: saved and restored with the checkpoint."""

    step: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"step": self.step, "extra": self.extra}

    @classmethod
    def from_state_dict(cls, d: dict) -> BudgetState:
        return cls(step=d["step"], extra=d.get("extra", {}))


def group_indices(trajectories: Sequence[Trajectory]) -> dict[str, list[int]]:
    """group_id -> indices into `trajectories`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group_id, []).append(i)
    return groups


@dataclass(frozen=True)
class SampleLimits:
    """What one step may spend on rollouts, from the rollout config."""

    prompts_per_step: int  # prompts a uniform policy samples
    group_size: int  # samples per prompt for a uniform policy
    min_group_size: int  # a priced policy gives an admitted prompt at least this many samples...
    max_group_size: int  # ...and at most this many

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


def _uniform_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                  rng: np.random.Generator, limits: SampleLimits) -> list[PromptDecision]:
    """The first `prompts_per_step` candidates (the trainer shuffles them) get `group_size` samples each."""
    return [PromptDecision(prompt_id=p, samples=limits.group_size if i < limits.prompts_per_step else 0)
            for i, p in enumerate(candidates)]


def _train_all(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory],
               current_version: int) -> list[TrajectoryDecision]:
    """`none`: vanilla GRPO/PPO, every trajectory is trained on."""
    return [TrajectoryDecision(fate="trained") for _ in trajectories]


def _drop_zero_variance(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory],
                        current_version: int) -> list[TrajectoryDecision]:
    """`zero_var`: DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476): a group whose rewards are all equal
    has zero group-relative advantage everywhere, so it carries no gradient and is not trained on."""
    out = [TrajectoryDecision(fate="trained") for _ in trajectories]
    for idx in group_indices(trajectories).values():
        rewards = [trajectories[i].reward for i in idx]
        if max(rewards) == min(rewards):
            for i in idx:
                out[i] = TrajectoryDecision(fate="zero_signal")
    return out


PlanFn = Callable[[BudgetConfig, BudgetState, Sequence[str], int, np.random.Generator, SampleLimits],
                  list[PromptDecision]]
PriceFn = Callable[[BudgetConfig, BudgetState, Sequence[Trajectory], int], list[TrajectoryDecision]]

PLANNERS: dict[str, PlanFn] = {"none": _uniform_plan, "zero_var": _uniform_plan}
PRICERS: dict[str, PriceFn] = {"none": _train_all, "zero_var": _drop_zero_variance}


def plan_prompts(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                 rng: np.random.Generator, limits: SampleLimits) -> list[PromptDecision]:
    """Before rollout: how many samples each candidate prompt gets (0 = skipped before rollout).

    `candidates` is a shuffled pool of prompt ids, `budget.pool_factor` times `prompts_per_step` long, so that a
    pricing policy can choose; it returns one decision per candidate, in the same order."""
    return PLANNERS[cfg.policy](cfg, state, candidates, step, rng, limits)


def price_trajectories(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory],
                       current_version: int) -> list[TrajectoryDecision]:
    """After rollout: price every trajectory and give it a fate (see FATES)."""
    return PRICERS[cfg.policy](cfg, state, trajectories, current_version)


def update_state(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory], step: int,
                 current_version: int, drift_kl: float | None = None) -> None:
    """After the step: fold the step's evidence into the state (posteriors, drift, controller).

    `drift_kl` is the trainer's measurement of how far the policy moved per version (mean per-token KL between the
    behaviour and current policy on this step's samples, divided by the version gap); None when not measured."""
    state.step = step + 1
