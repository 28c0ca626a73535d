"""From a TaskConfig to the task the trainer runs: a plain dict from task name to builder."""

from __future__ import annotations

from collections.abc import Callable

from rollout.config import RolloutConfig, TaskConfig
from rollout.tasks import TaskSet, build_arith


class TaskError(ValueError):
    """A task the config asks for cannot be built (missing file, bad reward function path, ...)."""


BUILDERS: dict[str, Callable[[TaskConfig, RolloutConfig], TaskSet]] = {"arith": build_arith}


def build_task(cfg: TaskConfig, rollout_cfg: RolloutConfig) -> TaskSet:
    if cfg.name not in BUILDERS:
        raise TaskError(f"task.name: {cfg.name!r} is not available yet (available: {', '.join(BUILDERS)})")
    return BUILDERS[cfg.name](cfg, rollout_cfg)
