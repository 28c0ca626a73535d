"""Errors a user can cause on the rollout side, each with a message that names the problem.

`TaskError` is raised while building a task (before any model loads); `RolloutError` and its subclasses while
rolling out, by user-supplied code or data, so the trainer can stop at that boundary with a clear message and
keep every step it already wrote."""

from __future__ import annotations


class TaskError(ValueError):
    """A task the config asks for cannot be built (missing file, bad reward function path, ...)."""


class RolloutError(RuntimeError):
    """User-supplied code or data failed during a rollout (not a bug in the trainer)."""


class RewardFunctionError(RolloutError):
    """A user reward function raised, or returned something other than one float-or-None per completion."""


class RewardTimeoutError(RewardFunctionError):
    """A user reward function did not return within task.reward_timeout_s."""
