"""From a TaskConfig to the task the trainer runs: a plain dict from task name to builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from marginal_rl.rollout.config import RolloutConfig, TaskConfig
from marginal_rl.rollout.dataset_task import build_dataset
from marginal_rl.rollout.errors import TaskError
from marginal_rl.rollout.fix_test_task import build_fix_test
from marginal_rl.rollout.tasks import TaskSet, build_arith

__all__ = ["BUILDERS", "TaskError", "build_task"]

BUILDERS: dict[str, Callable[..., TaskSet]] = {
    "arith": build_arith,
    "fix_test": build_fix_test,
    "dataset": build_dataset,
}


def build_task(cfg: TaskConfig, rollout_cfg: RolloutConfig, reward_funcs: Sequence[Callable[..., Any]] = ()) -> TaskSet:
    """The task `cfg.name` names; `reward_funcs` (callables) only for the dataset task, which scores with them."""
    if cfg.name not in BUILDERS:
        raise TaskError(f"task.name: {cfg.name!r} is not available yet (available: {', '.join(BUILDERS)})")
    if reward_funcs:
        if cfg.name != "dataset":
            raise TaskError(f"reward_funcs: only task.name=dataset scores with reward functions; this run has "
                            f"task.name={cfg.name}")
        return build_dataset(cfg, rollout_cfg, reward_funcs)
    return BUILDERS[cfg.name](cfg, rollout_cfg)
