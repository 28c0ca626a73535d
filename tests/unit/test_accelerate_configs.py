"""The launcher configs in configs/accelerate/: each loads with accelerate's own config class, every nested key is
one the launcher knows (accelerate copies nested keys onto its arguments without checking, so a misspelt key would
be silently ignored), and each resolves to the launch mode and settings its name promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
NAMES = ["single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc"]


def _resolve(name: str, *extra: str):
    args = launch_command_parser().parse_args(["--config_file", str(DIR / f"{name}.yaml"), *extra, "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def test_every_shipped_launcher_config_is_tested():
    assert sorted(p.stem for p in DIR.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_loads_and_every_nested_key_is_a_launcher_argument(name):
    cfg = ClusterConfig.from_yaml_file(str(DIR / f"{name}.yaml"))
    known = set(vars(launch_command_parser().parse_args(["train.py"])))
    for key in cfg.deepspeed_config:
        assert key in known, f"deepspeed_config.{key} is not an accelerate launch argument"
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in known, f"fsdp_config.{key} is unknown"


@pytest.mark.parametrize(("name", "processes", "mode"), [
    ("single_gpu", 1, None), ("multi_gpu_ddp", 8, "multi_gpu"), ("fsdp", 8, "use_fsdp"),
    ("deepspeed_zero2", 8, "use_deepspeed"), ("deepspeed_zero3", 8, "use_deepspeed"), ("cpu_2proc", 2, "multi_gpu"),
])
def test_resolves_to_its_launch_mode(name, processes, mode):
    args = _resolve(name)
    assert args.num_processes == processes and args.num_machines == 1
    modes = {m: bool(getattr(args, m)) for m in ("multi_gpu", "use_fsdp", "use_deepspeed", "cpu")}
    assert modes == {m: m == mode for m in modes}  # `cpu` would select the one-process launcher


def test_num_processes_on_the_command_line_wins():
    assert _resolve("multi_gpu_ddp", "--num_processes", "4").num_processes == 4


def test_fsdp_settings():
    args = _resolve("fsdp")
    assert (args.fsdp_sharding_strategy, args.fsdp_auto_wrap_policy, args.fsdp_transformer_layer_cls_to_wrap) == \
        ("FULL_SHARD", "TRANSFORMER_BASED_WRAP", "LlamaDecoderLayer")
    assert args.fsdp_use_orig_params is True and args.fsdp_state_dict_type == "FULL_STATE_DICT"


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_settings(name, stage):
    args = _resolve(name)
    assert args.zero_stage == stage
    assert (args.offload_optimizer_device, args.offload_param_device) == ("none", "none")
    # left to the trainer, which sets it from train.max_grad_norm before accelerator.prepare
    assert args.gradient_clipping is None
    assert args.gradient_accumulation_steps == 1  # the trainer marks the accumulation boundary itself
    assert args.zero3_init_flag is False  # the trainer loads whole weights (the reference and snapshot are copies)
