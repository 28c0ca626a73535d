"""`none`: vanilla GRPO/PPO. Every drawn prompt gets `group_size` samples; every trajectory is trained on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies.base import Policy, TrajectoryArrays, uniform_plan
from marginal_rl.budget.pricing import PriceComponents
from marginal_rl.budget.records import TRAINED


@dataclass
class NoneConfig(BudgetConfig):
    policy = "none"


def fates_none(cfg: BudgetConfig, arrays: TrajectoryArrays, comp: PriceComponents) -> np.ndarray:
    return np.full(len(arrays.reward), TRAINED, dtype=np.int8)


POLICY = Policy(NoneConfig, plan=uniform_plan, fates=fates_none)
