"""`zero_var`: DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476). Every drawn prompt gets `group_size`
samples; a group whose rewards are all equal has zero group-relative advantage everywhere, so it carries no
gradient and is not trained on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies.base import Policy, TrajectoryArrays, uniform_plan
from marginal_rl.budget.pricing import PriceComponents
from marginal_rl.budget.records import TRAINED, ZERO_SIGNAL


@dataclass
class ZeroVarConfig(BudgetConfig):
    policy = "zero_var"


def fates_zero_var(cfg: BudgetConfig, arrays: TrajectoryArrays, comp: PriceComponents) -> np.ndarray:
    return np.where(comp.zero_var, ZERO_SIGNAL, TRAINED).astype(np.int8)


POLICY = Policy(ZeroVarConfig, plan=uniform_plan, fates=fates_zero_var)
