"""Per-step `budget/...` scalars and price-component lists for histograms. Pure: records in, numbers out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from budget.config import BudgetConfig
from budget.policies import FATES, BudgetState, PromptDecision, TrajectoryDecision, current_drift, group_indices
from rollout.types import Trajectory

COMPONENTS = ("gain", "cost", "risk", "price", "advantage", "depreciation", "risk_variance", "risk_staleness")


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def price_components(decisions: Sequence[TrajectoryDecision]) -> dict[str, list[float]]:
    """Every recorded price component, one list per component over the step's trajectories (for histograms)."""
    return {k: [float(getattr(d, k)) for d in decisions] for k in COMPONENTS}


def step_metrics(plan: Sequence[PromptDecision], decisions: Sequence[TrajectoryDecision],
                 trajectories: Sequence[Trajectory], state: BudgetState, *,
                 cfg: BudgetConfig | None = None) -> dict[str, float]:
    """This step's `budget/...` scalars. Means are NaN where there is nothing to average. Controller and drift
    values are those of `state` as passed (call after update_state to log the values the next step will use)."""
    sampled = [d for d in plan if d.samples > 0]
    groups = group_indices(trajectories)
    informative = [len({trajectories[i].reward for i in idx}) > 1 for idx in groups.values()]
    out: dict[str, float] = {
        "budget/prompts_candidates": float(len(plan)),
        "budget/prompts_sampled": float(len(sampled)),
        "budget/prompts_skipped": float(len(plan) - len(sampled)),
        "budget/samples_planned": float(sum(d.samples for d in sampled)),
        "budget/group_size_mean": _mean([d.samples for d in sampled]),
        "budget/group_size_max": float(max((d.samples for d in sampled), default=0)),
        "budget/planned_tokens": float(sum(d.tokens for d in sampled)),
        "budget/prompt_gain_mean": _mean([d.gain for d in sampled]),
        "budget/prompt_cost_mean": _mean([d.cost for d in sampled]),
        "budget/prompt_price_mean": _mean([d.price for d in sampled]),
        "budget/prompt_price_skipped_mean": _mean([d.price for d in plan if d.samples == 0]),
        "budget/prompt_pass_rate_mean": _mean([d.pass_rate for d in sampled]),
        "budget/prompt_informative_pred": _mean([d.informative for d in sampled]),
        "budget/groups_informative_fraction": _mean([float(x) for x in informative]),
        "budget/admitted_fraction": _mean([float(d.trained) for d in decisions]),
        "budget/price_mean": _mean([d.price for d in decisions]),
        "budget/gain_mean": _mean([d.gain for d in decisions]),
        "budget/cost_mean": _mean([d.cost for d in decisions]),
        "budget/risk_mean": _mean([d.risk for d in decisions]),
        "budget/positive_price_fraction": _mean([float(d.price > 0) for d in decisions]),
        "budget/staleness_mean": _mean([float(d.staleness) for d in decisions]),
        "budget/depreciation_mean": _mean([d.depreciation for d in decisions]),
        "budget/kappa_scale": float(state.kappa_scale),
        "budget/spend_tokens": float(state.last_spend),
        "budget/prompts_tracked": float(len(state.prompts)),
        "budget/drift": float("nan") if state.drift is None else float(state.drift),
    }
    out.update({f"budget/fraction_{fate}": _mean([float(d.fate == fate) for d in decisions]) for fate in FATES})
    if cfg is not None:
        out["budget/drift"] = current_drift(cfg, state)
        out["budget/controller_price"] = state.kappa_scale * cfg.kappa_rollout
        out["budget/kappa_verify_effective"] = state.kappa_scale * cfg.kappa_verify
        out["budget/kappa_update_effective"] = state.kappa_scale * cfg.kappa_update
    return out
