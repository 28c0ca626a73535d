"""Typed config of the budget module: the keys every allocation policy reads (the prices every arm records, so
that arms can be compared). Each policy subclasses BudgetConfig in its own file (budget/policies/) with the keys
only it reads; `budget.policy` chooses the subclass and the loader rejects a key of another policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

RISK_MEASURES = ("std", "cvar")


@dataclass
class BudgetConfig:
    policy: ClassVar[str]  # the allocation policy (budget/policies/): set by each subclass
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
        metadata={"help": "the pool of candidate prompts drawn per step, as a multiple of prompts_per_step (every "
                          "policy draws the same pool; prior and marginal choose among all of it, the others take "
                          "its first prompts_per_step)"},
    )
    prior_alpha: float = field(
        default=1.0, metadata={"help": "Beta prior pseudo-successes of an unseen prompt's pass rate"}
    )
    prior_beta: float = field(
        default=1.0, metadata={"help": "Beta prior pseudo-failures of an unseen prompt's pass rate"}
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

    target_reward: float = field(
        default=0.5, metadata={"help": "eval reward whose first attainment ledger/tokens_to_target reports"}
    )
    target_delta: float = field(default=0.0, metadata={
        "help": "a second target relative to the run's own start: the first eval + delta, whose first attainment "
                "ledger/tokens_to_target_delta reports (0 = off)"})
    target_metric: str = field(default="eval/reward", metadata={
        "help": "the eval metric both targets (and the ledger's eval history) read: eval/reward (sampled at "
                "rollout.eval_temperature) | eval/reward_greedy"})
    drift_probe: int = field(
        default=16, metadata={"help": "trained sequences re-scored after each update to measure the policy's drift (KL)"}
    )

    def __post_init__(self) -> None:
        if self.drift_probe < 0:
            raise ValueError(f"drift_probe: expected an integer >= 0, got {self.drift_probe}")
        if self.risk_measure not in RISK_MEASURES:
            raise ValueError(f"risk_measure: expected one of {list(RISK_MEASURES)}, got {self.risk_measure!r}")
        if self.pool_factor < 1:
            raise ValueError(f"pool_factor: expected an integer >= 1, got {self.pool_factor}")
        if not math.isfinite(self.target_reward):
            raise ValueError(f"target_reward: expected a finite number, got {self.target_reward}")
        if not self.target_delta >= 0:
            raise ValueError(f"target_delta: expected a number >= 0 (0 = off), got {self.target_delta}")
        if self.target_metric not in ("eval/reward", "eval/reward_greedy"):
            raise ValueError(f"target_metric: expected eval/reward or eval/reward_greedy, got {self.target_metric!r}")
        for key in ("value", "kappa_rollout", "kappa_verify", "kappa_update", "risk_aversion", "drift_prior",
                    "gain_half_samples"):
            if not getattr(self, key) >= 0:  # also rejects NaN
                raise ValueError(f"{key}: expected a number >= 0, got {getattr(self, key)}")
        for key in ("prior_alpha", "prior_beta", "drift_scale", "prior_tokens"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: expected a number > 0, got {getattr(self, key)}")
        if not 0 <= self.ema <= 1:
            raise ValueError(f"ema: expected a number in [0, 1], got {self.ema}")
        if not 0 < self.cvar_alpha <= 1:
            raise ValueError(f"cvar_alpha: expected a number in (0, 1], got {self.cvar_alpha}")

