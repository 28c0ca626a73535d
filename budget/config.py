"""Typed config of the budget module: which allocation policy, and the prices it trades against."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POLICIES = ("none", "zero_var", "max_var", "prior", "marginal")
RISK_MEASURES = ("std", "cvar")


@dataclass
class BudgetConfig:
    policy: str = field(default="zero_var", metadata={"help": f"allocation policy: one of {', '.join(POLICIES)}"})
    value: float = field(default=1.0, metadata={"help": "V: value of one unit of learning gain, in reward units"})
    kappa_rollout: float = field(
        default=1e-3, metadata={"help": "price per rollout token (prefill + decode + observation)"}
    )
    kappa_verify: float = field(default=1e-3, metadata={"help": "price per verification token"})
    kappa_update: float = field(
        default=5e-4, metadata={"help": "price per training token (forward + backward, per epoch)"}
    )
    pool_factor: int = field(
        default=4,
        metadata={"help": "candidate prompts offered to the planner per step, as a multiple of prompts_per_step"},
    )
    token_budget: int = field(
        default=0,
        metadata={"help": "tokens per step (rollout + training); > 0 makes the κ scale a dual variable that the"
                          " controller adjusts, 0 = fixed prices"},
    )
    budget_slack: float = field(
        default=1.5,
        metadata={"help": "with token_budget: the planner never plans more than this multiple of the budget in "
                          "one step"},
    )
    max_samples_per_step: int = field(
        default=0,
        metadata={"help": "with token_budget: the planner never plans more than this many samples in one step; "
                          "0 = budget_slack × prompts_per_step × group_size"},
    )
    controller_rate: float = field(
        default=0.3,
        metadata={"help": "with token_budget: step size of the multiplicative dual update κ ← "
                          "κ·exp(rate·(spend/budget − 1))"},
    )
    kappa_scale_min: float = field(
        default=1e-3, metadata={"help": "with token_budget: lower bound of the controller's κ multiplier"}
    )
    kappa_scale_max: float = field(
        default=1e3, metadata={"help": "with token_budget: upper bound of the controller's κ multiplier"}
    )
    prior_alpha: float = field(
        default=1.0, metadata={"help": "Beta prior pseudo-successes of an unseen prompt's pass rate"}
    )
    prior_beta: float = field(
        default=1.0, metadata={"help": "Beta prior pseudo-failures of an unseen prompt's pass rate"}
    )
    thompson: bool = field(
        default=True,
        metadata={"help": "marginal: price each prompt at a pass rate drawn from its posterior (exploration) "
                          "instead of the posterior mean"},
    )
    gain_half_samples: float = field(
        default=8.0,
        metadata={"help": "n0: a group of n teaches in proportion to n/(n + n0) (estimator precision; "
                          "diminishing returns per prompt)"},
    )
    drift_prior: float = field(
        default=0.01,
        metadata={"help": "per-version policy drift δ (mean per-token KL, nats) assumed until the trainer "
                          "measures one"},
    )
    drift_scale: float = field(
        default=0.1,
        metadata={"help": "cumulative drift (nats/token) over which evidence and stale gains keep 1/e of their weight"},
    )
    ema: float = field(
        default=0.9, metadata={"help": "weight on the old value in the drift and token-length moving averages"}
    )
    risk_aversion: float = field(
        default=0.25, metadata={"help": "ρ: price of one unit of risk (std or CVaR shortfall of a trajectory's gain)"}
    )
    risk_measure: str = field(
        default="std",
        metadata={"help": f"risk of a gain estimate: one of {', '.join(RISK_MEASURES)} (cvar = expected "
                          f"shortfall in the lower tail, normal approximation)"},
    )
    cvar_alpha: float = field(default=0.1, metadata={"help": "risk_measure=cvar: tail probability α"})
    prior_tokens: float = field(
        default=20.0,
        metadata={"help": "expected rollout tokens per sample of a prompt before any sample has been seen"},
    )
    keep_fraction: float = field(
        default=0.5, metadata={"help": "max_var: fraction m/n of each group kept (the max-variance subset)"}
    )
    explore_prob: float = field(
        default=0.5,
        metadata={"help": "prior: a prompt zero-variance in its last z groups is sampled with probability "
                          "explore_prob**z"},
    )

    target_reward: float = field(
        default=0.5, metadata={"help": "eval reward whose first attainment ledger/tokens_to_target reports"}
    )
    drift_probe: int = field(
        default=16, metadata={"help": "trained sequences re-scored after each update to measure the policy's drift (KL)"}
    )

    def __post_init__(self) -> None:
        if self.drift_probe < 0:
            raise ValueError(f"drift_probe: expected an integer >= 0, got {self.drift_probe}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {list(POLICIES)}, got {self.policy!r}")
        if self.risk_measure not in RISK_MEASURES:
            raise ValueError(f"risk_measure: expected one of {list(RISK_MEASURES)}, got {self.risk_measure!r}")
        if self.pool_factor < 1:
            raise ValueError(f"pool_factor: expected an integer >= 1, got {self.pool_factor}")
        if not math.isfinite(self.target_reward):
            raise ValueError(f"target_reward: expected a finite number, got {self.target_reward}")
        if self.max_samples_per_step < 0:
            raise ValueError(f"max_samples_per_step: expected an integer >= 0 (0 = budget_slack × samples per step), "
                             f"got {self.max_samples_per_step}")
        if self.token_budget < 0:
            raise ValueError(f"token_budget: expected an integer >= 0 (0 = fixed prices), got {self.token_budget}")
        for key in ("value", "kappa_rollout", "kappa_verify", "kappa_update", "risk_aversion", "drift_prior",
                    "controller_rate", "gain_half_samples"):
            if not getattr(self, key) >= 0:  # also rejects NaN
                raise ValueError(f"{key}: expected a number >= 0, got {getattr(self, key)}")
        for key in ("prior_alpha", "prior_beta", "drift_scale", "prior_tokens", "kappa_scale_min"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: expected a number > 0, got {getattr(self, key)}")
        if self.kappa_scale_max < self.kappa_scale_min:
            raise ValueError(f"kappa_scale_max: expected a number >= kappa_scale_min ({self.kappa_scale_min}), "
                             f"got {self.kappa_scale_max}")
        if not self.budget_slack >= 1:
            raise ValueError(f"budget_slack: expected a number >= 1, got {self.budget_slack}")
        for key in ("ema", "explore_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}: expected a number in [0, 1], got {getattr(self, key)}")
        for key in ("cvar_alpha", "keep_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key}: expected a number in (0, 1], got {getattr(self, key)}")
