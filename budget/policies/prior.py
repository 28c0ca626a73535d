"""`prior`: skip prompts before rollout from their history, as GRESO does (Zhang et al. 2025, arXiv 2506.02177):
a prompt whose last z groups were all zero-variance is rolled out with probability explore_prob**z (so it is still
explored now and then), the others always; candidates are taken in order until prompts_per_step are kept. MoPPS
(Qu et al. 2025, arXiv 2507.04632) predicts the same from a decayed Beta posterior; `marginal` prices that. After
rollout, as `zero_var`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies.base import Policy, SampleLimits, priced_plan, prompt_arrays
from marginal_rl.budget.policies.zero_var import fates_zero_var
from marginal_rl.budget.records import HISTORY, POOL_FULL, PromptPlan
from marginal_rl.budget.state import BudgetState


@dataclass
class PriorConfig(BudgetConfig):
    policy = "prior"
    explore_prob: float = field(default=0.5, metadata={"help": "a prompt zero-variance in its last z groups is "
                                                               "sampled with probability explore_prob**z"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.explore_prob <= 1:
            raise ValueError(f"explore_prob: expected a number in [0, 1], got {self.explore_prob}")


def plan_prior(cfg: PriorConfig, state: BudgetState, candidates: Sequence[str], step: int,
               rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    arrays = prompt_arrays(cfg, state, candidates)
    keep = rng.random(len(candidates)) < cfg.explore_prob ** arrays.streak
    chosen = keep & (np.cumsum(keep) <= limits.prompts_per_step)
    return priced_plan(cfg, state, candidates, np.where(chosen, limits.group_size, 0), limits, arrays,
                       skip_reason=np.where(keep, POOL_FULL, HISTORY))


POLICY = Policy(PriorConfig, plan=plan_prior, fates=fates_zero_var, chooses=True)
