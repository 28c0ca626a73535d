"""Typed configs for the rollout side: which tasks, and how trajectories are sampled."""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("arith", "fix_test", "dataset")


@dataclass
class TaskConfig:
    name: str = field(default="arith", metadata={"help": f"task source: one of {', '.join(TASKS)}"})
    num_train: int = field(default=512, metadata={"help": "number of training prompts generated (built-in tasks)"})
    num_eval: int = field(default=128, metadata={"help": "number of held-out eval prompts (built-in tasks)"})
    seed: int = field(default=1234, metadata={"help": "seed of the task generator (independent of the run seed)"})
    dataset: str = field(
        default="", metadata={"help": "task=dataset: local .jsonl/.parquet file or datasets directory with a `prompt` column"}
    )
    eval_dataset: str = field(default="", metadata={"help": "task=dataset: optional held-out file; default: a split of `dataset`"})
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "task=dataset: dotted paths of TRL-style reward functions f(prompts, completions, **columns)"}
    )
    reward_weights: list[float] = field(
        default_factory=list, metadata={"help": "weights of reward_funcs (default: all 1.0)"}
    )
    source: str = field(default="generated", metadata={"help": "task=fix_test: `generated` (small graded bugs) or `humaneval`"})
    step_cost: float = field(
        default=0.0, metadata={"help": "task=fix_test: reward charged per policy token, so the agent learns when verifying pays"}
    )
    defer_reward: float = field(default=0.0, metadata={"help": "task=fix_test: reward for giving up (defer)"})
    few_shot: bool = field(
        default=True, metadata={"help": "task=fix_test, chat models: show one worked episode (chat messages) before the "
                                        "task; models without a chat template never see it"})
    warm_start_episodes: int = field(
        default=1000, metadata={"help": "task=fix_test: demonstration episodes (run in the sandbox) for the tiny policy's warm start"}
    )

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"name: expected one of {list(TASKS)}, got {self.name!r}")
        if self.num_train < 1:
            raise ValueError(f"num_train: expected an integer >= 1, got {self.num_train}")
        if self.num_eval < 0:
            raise ValueError(f"num_eval: expected an integer >= 0, got {self.num_eval}")
        if self.name == "dataset" and not self.dataset:
            raise ValueError("dataset: expected a path when task.name=dataset, got nothing")
        if self.name == "dataset" and not self.reward_funcs:
            raise ValueError("reward_funcs: expected at least one dotted path when task.name=dataset")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights: expected {len(self.reward_funcs)} weights (one per reward_func), got {len(self.reward_weights)}"
            )
        if self.warm_start_episodes < 1:
            raise ValueError(f"warm_start_episodes: expected an integer >= 1, got {self.warm_start_episodes}")
        if self.step_cost < 0:
            raise ValueError(f"step_cost: expected a number >= 0, got {self.step_cost}")
        if self.source not in ("generated", "humaneval"):
            raise ValueError(f"source: expected 'generated' or 'humaneval', got {self.source!r}")


@dataclass
class RolloutConfig:
    prompts_per_step: int = field(default=16, metadata={"help": "prompts drawn per training step (before the budget decides)"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt (the GRPO group); the budget may vary it within min/max"})
    min_group_size: int = field(default=2, metadata={"help": "smallest group the budget may allocate to an admitted prompt"})
    max_group_size: int = field(default=16, metadata={"help": "largest group the budget may allocate to one prompt"})
    max_new_tokens: int = field(default=16, metadata={"help": "token limit of one completion (one turn for agents)"})
    max_turns: int = field(default=6, metadata={"help": "agent tasks: turn limit of an episode"})
    max_episode_tokens: int = field(default=1024, metadata={"help": "agent tasks: token limit of a whole episode (policy + observations)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (1.0 = off)"})
    batch_size: int = field(default=256, metadata={"help": "sequences per generate() call (memory bound, not a training knob)"})
    eval_temperature: float = field(
        default=1.0, metadata={"help": "eval sampling temperature (0 = greedy; greedy reward is always logged too)"}
    )
    eval_samples: int = field(default=4, metadata={"help": "samples per eval prompt at eval_temperature"})
    env_workers: int = field(
        default=2, metadata={"help": "agent tasks: environment steps run in parallel (each test run is a sandboxed process)"}
    )
    max_staleness: int = field(
        default=0, metadata={"help": "rollouts may run ahead of training by up to this many policy versions (0 = on-policy)"}
    )
    async_rollout: bool = field(
        default=False, metadata={"help": "generate the next step's rollouts in a background thread, from the lagging "
                                         "snapshot, while this step trains (needs max_staleness >= 1)"}
    )

    def __post_init__(self) -> None:
        for key in ("prompts_per_step", "group_size", "min_group_size", "max_group_size", "max_new_tokens", "max_turns",
                    "max_episode_tokens", "batch_size", "eval_samples", "env_workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.min_group_size > self.max_group_size:
            raise ValueError(f"min_group_size: expected <= max_group_size ({self.max_group_size}), got {self.min_group_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected a number > 0 for training rollouts, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: expected an integer >= 0, got {self.max_staleness}")
        if self.async_rollout and self.max_staleness < 1:
            raise ValueError("async_rollout: the next step's rollouts are generated before this step's update, so "
                             "they are at least one version stale: set rollout.max_staleness >= 1")
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature: expected a number >= 0, got {self.eval_temperature}")
