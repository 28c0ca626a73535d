"""train/zero.py's configuration of the DeepSpeed engine, on stand-ins for accelerate's objects (no DeepSpeed
needed): the keys it fills before accelerator.prepare and what it refuses with a named ConfigError."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from marginal_rl.train import zero
from marginal_rl.train.config import ConfigError, load_config


def _accelerator(stage: int = 2, zero3_init: bool = False, **ds):
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": "auto",
              "zero_optimization": {"stage": stage}, **ds}
    plugin = SimpleNamespace(deepspeed_config=config, zero_stage=stage, zero3_init_flag=zero3_init)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("stage", [2, 3])
def test_fills_what_accelerate_cannot_and_what_the_update_needs(stage):
    acc = _accelerator(stage)
    zero.configure(acc, load_config([], ["train.max_grad_norm=0.5"]))
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 1  # an integer: accelerate refuses `auto` without a dataloader
    assert ds["gradient_clipping"] == 0.5  # the engine clips, at train.max_grad_norm
    assert ds["gradient_accumulation_steps"] == 1  # else the engine divides every loss by it
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_bf16_engine_checks_for_non_finite_gradients():
    acc = _accelerator(bf16={"enabled": True})
    zero.configure(acc, load_config([], []))
    assert acc.state.deepspeed_plugin.deepspeed_config["bf16"]["check_grad_overflow"] is True


def test_clipping_off_and_an_explicit_matching_value_are_kept():
    acc = _accelerator(gradient_clipping=1.0, train_micro_batch_size_per_gpu=4)
    zero.configure(acc, load_config([], []))  # train.max_grad_norm defaults to 1.0
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    acc = _accelerator()
    zero.configure(acc, load_config([], ["train.max_grad_norm=0"]))
    assert acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0  # DeepSpeed: 0 = no clipping


@pytest.mark.parametrize(("accelerator", "overrides", "names"), [
    (_accelerator(), ["train.save_every=5"], "train.save_every"),
    (_accelerator(), ["train.resume_from=latest"], "train.resume_from"),
    (_accelerator(3, zero3_init=True), [], "zero3_init_flag"),
    (_accelerator(gradient_accumulation_steps=4), [], "gradient_accumulation_steps"),
    (_accelerator(gradient_clipping=0.3), [], "gradient_clipping"),
])
def test_refuses_what_it_does_not_support_by_name(accelerator, overrides, names):
    with pytest.raises(ConfigError, match=names):
        zero.configure(accelerator, load_config([], overrides))


def test_use_cpu_would_silently_drop_deepspeed(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU"):
        zero.build_accelerator(cpu=True)


def test_ppo_value_head_joins_the_policy_and_stays_out_of_final_weights():
    import torch

    policy, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    model = zero.with_value_head(policy, head)
    assert model is policy and {id(p) for p in head.parameters()} <= {id(p) for p in model.parameters()}
    assert sorted(zero.policy_weights(model.state_dict())) == ["bias", "weight"]
    assert zero.policy_weights(None) is None  # ranks other than the main one get no state dict under ZeRO-3
