"""Shared fixtures: a tiny policy built once per session (offline, seconds), no W&B, no progress bars."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def policy_cache(tmp_path_factory):
    """A model cache dir shared by the tests of a session, so the tiny policy is built and warm-started once."""
    return str(tmp_path_factory.mktemp("policy_cache"))


def tiny_overrides(cache_dir: str, output_dir: str) -> list[str]:
    """A run small enough for a test: 64-wide model, short warm start, few prompts."""
    return [
        f"output_dir={output_dir}", f"model.cache_dir={cache_dir}", "model.hidden_size=64", "model.warm_start_steps=400",
        "model.warm_start_lr=5e-3", "task.num_train=64", "task.num_eval=16", "rollout.prompts_per_step=8",
        "rollout.group_size=4", "rollout.max_new_tokens=6", "rollout.eval_samples=1", "train.eval_every=0",
        "log.report_to=none", "log.progress=false",
    ]
