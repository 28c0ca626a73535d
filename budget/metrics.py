"""Per-step `budget/...` scalars and price-component lists for histograms. Pure: records in, numbers out."""

from __future__ import annotations

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies.base import FamilyRows, prior_strength
from marginal_rl.budget.records import FATES, PromptPlan, TrajectoryPrices
from marginal_rl.budget.state import BudgetState, current_drift, dispersion_source
from marginal_rl.rollout.types import TrajectoryColumns

COMPONENTS = ("gain", "cost", "risk", "price", "advantage", "depreciation", "risk_variance", "risk_staleness")


def _mean(total: float, n: int) -> float:
    """total / n, NaN when there is nothing to average."""
    return float(total / n) if n else float("nan")


def price_histograms(prices: TrajectoryPrices) -> dict[str, np.ndarray]:
    """Every recorded price component, one read-only (N,) array per component over the step's trajectories (for
    histograms)."""
    return {k: getattr(prices, k) for k in COMPONENTS}


def step_metrics(plan: PromptPlan, prices: TrajectoryPrices, cols: TrajectoryColumns, state: BudgetState, *,
                 cfg: BudgetConfig | None = None) -> dict[str, float]:
    """This step's `budget/...` scalars. Means are NaN where there is nothing to average. Controller and drift
    values are those of `state` as passed (call after update_state to log the values the next step will use)."""
    sampled = plan.samples > 0
    n_plan, n_sampled, n = len(plan), int(np.count_nonzero(sampled)), len(prices)
    # several columns summed at once, one C-contiguous row each: a row sums as its column alone would (as np.mean)
    plan_rows = np.array([plan.gain, plan.cost, plan.price, plan.pass_rate, plan.informative, plan.samples])
    gain, cost, price, pass_rate, informative, samples = plan_rows.compress(sampled, axis=1).sum(axis=1).tolist()
    price_rows = np.array([prices.price, prices.gain, prices.cost, prices.risk, prices.staleness, prices.depreciation])
    t_price, t_gain, t_cost, t_risk, t_staleness, t_depreciation = price_rows.sum(axis=1).tolist()
    fates = np.bincount(prices.fate_code, minlength=len(FATES)).tolist()
    out: dict[str, float] = {
        "budget/prompts_candidates": float(n_plan),
        "budget/prompts_sampled": float(n_sampled),
        "budget/prompts_skipped": float(n_plan - n_sampled),
        "budget/samples_planned": samples,
        "budget/group_size_mean": _mean(samples, n_sampled),
        "budget/group_size_max": float(plan.samples.max(initial=0)),
        "budget/planned_tokens": float(sum(plan.tokens[sampled].tolist())),
        "budget/prompt_gain_mean": _mean(gain, n_sampled),
        "budget/prompt_cost_mean": _mean(cost, n_sampled),
        "budget/prompt_price_mean": _mean(price, n_sampled),
        "budget/prompt_price_skipped_mean": _mean(plan.price[~sampled].sum(), n_plan - n_sampled),
        "budget/prompt_pass_rate_mean": _mean(pass_rate, n_sampled),
        "budget/prompt_informative_pred": _mean(informative, n_sampled),
        "budget/groups_informative_fraction": _mean(cols.num_groups - int(np.count_nonzero(cols.group_flat)),
                                                         cols.num_groups),
        "budget/admitted_fraction": _mean(fates[0], n),
        "budget/price_mean": _mean(t_price, n),
        "budget/gain_mean": _mean(t_gain, n),
        "budget/cost_mean": _mean(t_cost, n),
        "budget/risk_mean": _mean(t_risk, n),
        "budget/positive_price_fraction": _mean(int(np.count_nonzero(prices.price > 0)), n),
        "budget/staleness_mean": _mean(t_staleness, n),
        "budget/depreciation_mean": _mean(t_depreciation, n),
        "budget/kappa_scale": float(state.kappa_scale),
        "budget/spend_tokens": float(state.last_spend),
        "budget/prompts_tracked": float(len(state.prompts)),
        "budget/drift": float("nan") if state.drift is None else float(state.drift),
    }
    out.update({f"budget/fraction_{fate}": _mean(k, n) for fate, k in zip(FATES, fates, strict=True)})
    if plan.pilot is not None:  # pilot then commit: how many pilots were grown, and the pilots' share of samples
        piloted = plan.pilot > 0
        out["budget/pilot_grown_fraction"] = _mean(int(np.count_nonzero(plan.samples[piloted] > plan.pilot[piloted])),
                                                   int(np.count_nonzero(piloted)))
        out["budget/pilot_samples_fraction"] = _mean(int(plan.pilot.sum()), samples)
    if cfg is not None:
        out["budget/drift"] = current_drift(cfg, state)
        out["budget/controller_price"] = state.kappa_scale * cfg.kappa_rollout
        out["budget/kappa_verify_effective"] = state.kappa_scale * cfg.kappa_verify
        out["budget/kappa_update_effective"] = state.kappa_scale * cfg.kappa_update
        book = {"groups": state.family_pairs, "probes": state.family_probe_squares}.get(dispersion_source(cfg))
        if book:  # budget.pool_dispersion: each family's estimated prior strength
            rows = FamilyRows(list(book), np.arange(len(book)))
            strength = prior_strength(cfg, state, rows, cfg.pool_strength)
            out["budget/family_strength_min"] = float(strength.min())
            out["budget/family_strength_median"] = float(np.median(strength))
            out["budget/family_strength_max"] = float(strength.max())
        if getattr(cfg, "pace", "step") == "run":
            out["budget/spend_total"] = float(state.spent_total)
            out["budget/spend_target"] = float(cfg.token_budget * state.step)
    return out
