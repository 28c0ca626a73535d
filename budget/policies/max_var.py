"""`max_var`: PODS max-variance down-sampling (Xu et al. 2025, arXiv 2504.13818). Every drawn prompt gets
`group_size` samples; of each group of n, the subset of m = max(2, round(keep_fraction·n)) with the largest reward
variance (top-k and bottom-(m − k) rewards) is trained on, the rest are dropped (fate dropped_price). As in PODS, a
zero-variance group's subset is still trained on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies.base import Policy, TrajectoryArrays, uniform_plan
from marginal_rl.budget.pricing import PriceComponents, max_variance_keep
from marginal_rl.budget.records import DROPPED_PRICE, TRAINED


@dataclass
class MaxVarConfig(BudgetConfig):
    policy = "max_var"
    keep_fraction: float = field(default=0.5, metadata={"help": "fraction m/n of each group kept (the max-variance "
                                                                "subset)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction: expected a number in (0, 1], got {self.keep_fraction}")


def fates_max_var(cfg: MaxVarConfig, arrays: TrajectoryArrays, comp: PriceComponents) -> np.ndarray:
    rewards, group = arrays.reward, arrays.group
    if not len(rewards):
        return np.zeros(0, dtype=np.int8)
    count = np.bincount(group)
    keep = np.minimum(count, np.maximum(2, np.rint(cfg.keep_fraction * count).astype(np.int64)))  # rint: as round()
    return np.where(max_variance_keep(rewards, group, keep), TRAINED, DROPPED_PRICE).astype(np.int8)


POLICY = Policy(MaxVarConfig, plan=uniform_plan, fates=fates_max_var)
