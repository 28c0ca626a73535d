"""LoRA: only adapters train, and with adapters disabled the model is exactly the base (the KL reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from marginal_rl.train.config import ConfigError, ModelConfig
from marginal_rl.train.lora import apply_lora, reference_logprobs_context
from marginal_rl.train.update import reference_context


def _base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_adapters_train_and_disabled_adapters_are_the_base():
    base = _base()
    frozen = copy.deepcopy(base)
    model = apply_lora(base, ModelConfig(lora_r=4, lora_alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 50, (2, 5))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # lora_B starts at zero: the second step makes the adapter non-trivial
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        base_logits = frozen(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)
        with reference_context(model, None) as ref:
            torch.testing.assert_close(ref(input_ids=ids).logits, base_logits)


def test_unknown_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="lora_target_modules"):
        apply_lora(_base(), ModelConfig(lora_r=4, lora_target_modules=["qkv"]))


def test_reference_context_is_the_base_before_and_after_training():
    base = _base()
    frozen = copy.deepcopy(base)
    model = apply_lora(base, ModelConfig(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj", "down_proj"]))
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        base_logits = frozen(input_ids=ids).logits
    with reference_logprobs_context(model) as ref:
        assert not torch.is_grad_enabled()  # the reference forward builds no graph
        torch.testing.assert_close(ref(input_ids=ids).logits, base_logits)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base_logits).abs().max() > 1e-4  # the adapter moved the policy
    with reference_logprobs_context(model) as ref:
        torch.testing.assert_close(ref(input_ids=ids).logits, base_logits)
    with torch.no_grad():  # and leaving the context turns the adapter back on
        assert (model(input_ids=ids).logits - base_logits).abs().max() > 1e-4
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_rank_zero_is_full_fine_tuning_and_needs_no_peft_model():
    base = _base()
    assert apply_lora(base, ModelConfig(lora_r=0)) is base
    with pytest.raises(TypeError, match="expected a peft model"):
        with reference_logprobs_context(base):
            pass
