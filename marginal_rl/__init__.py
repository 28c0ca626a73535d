"""marginal-rl: risk-adjusted RL fine-tuning for language-model agents. Every prompt is priced before rollout and
every trajectory after it; the trainer learns only from what is worth its tokens, and a ledger records every token.

From Python (a notebook, a script), the same run as `marginal-rl train`:

    import marginal_rl as mrl

    cfg = mrl.load_config(["configs/quickstart.yaml"], ["train.max_steps=20", "log.report_to=none"])
    summary = mrl.fit(cfg)

    def brevity(prompts, completions, **columns):          # TRL's reward-function signature
        return [1.0 / (1 + len(c)) for c in completions]

    cfg = mrl.load_config(overrides=["task.name=dataset", "task.dataset=examples/arithmetic_small.jsonl"])
    summary = mrl.fit(cfg, reward_funcs=[brevity])       # callables, beside any dotted paths in task.reward_funcs

The package maps the repository's folders: marginal_rl.rollout (tasks, agent, generator, sandbox),
marginal_rl.budget (pricing, policies, ledger), marginal_rl.train (config, loop, losses, checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from marginal_rl.train.config import ConfigError, RunConfig, config_to_dict, load_config

__all__ = ["ConfigError", "RunConfig", "config_to_dict", "fit", "load_config"]


def fit(cfg: RunConfig, *, reward_funcs: Sequence[Callable[..., Any]] = ()) -> dict:
    """Build the config's task and train on it; returns the run's summary (also written to `output_dir`).

    `reward_funcs`: reward functions with TRL's signature `f(prompts, completions, **columns) -> list[float]`, for
    `task.name=dataset` (scored after those `task.reward_funcs` names, weighted by `task.reward_weights`)."""
    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.loop import train

    return train(cfg, build_task(cfg.task, cfg.rollout, reward_funcs))
