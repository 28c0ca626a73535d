"""Typed config of the budget module: which allocation policy, and the prices it trades against."""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("none", "zero_var", "max_var", "prior", "marginal")


@dataclass
class BudgetConfig:
    policy: str = field(default="zero_var", metadata={"help": f"allocation policy: one of {', '.join(POLICIES)}"})
    value: float = field(default=1.0, metadata={"help": "V: value of one unit of learning gain, in reward units"})
    kappa_rollout: float = field(default=1e-4, metadata={"help": "price per rollout token (prefill + decode + observation)"})
    kappa_verify: float = field(default=1e-4, metadata={"help": "price per verification token"})
    kappa_update: float = field(default=5e-5, metadata={"help": "price per training token (forward + backward)"})
    pool_factor: int = field(default=4, metadata={"help": "candidate prompts offered to the planner per step, as a multiple of prompts_per_step"})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {list(POLICIES)}, got {self.policy!r}")
        if self.pool_factor < 1:
            raise ValueError(f"pool_factor: expected an integer >= 1, got {self.pool_factor}")
        for key in ("value", "kappa_rollout", "kappa_verify", "kappa_update"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: expected a number >= 0, got {getattr(self, key)}")
