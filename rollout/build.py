"""From a TaskConfig to the task the trainer runs: a plain dict from task name to builder."""

from __future__ import annotations

from collections.abc import Callable

from rollout.config import RolloutConfig, TaskConfig
from rollout.dataset_task import build_dataset
from rollout.errors import TaskError
from rollout.fix_test_task import build_fix_test
from rollout.tasks import TaskSet, build_arith

__all__ = ["BUILDERS", "TaskError", "build_task"]

BUILDERS: dict[str, Callable[[TaskConfig, RolloutConfig], TaskSet]] = {
    "arith": build_arith,
    "fix_test": build_fix_test,
    "dataset": build_dataset,
}


def build_task(cfg: TaskConfig, rollout_cfg: RolloutConfig) -> TaskSet:
    if cfg.name not in BUILDERS:
        raise TaskError(f"task.name: {cfg.name!r} is not available yet (available: {', '.join(BUILDERS)})")
    return BUILDERS[cfg.name](cfg, rollout_cfg)
