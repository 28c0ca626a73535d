"""LoRA: only adapters train, and with adapters disabled the model is exactly the base (the KL reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.config import ConfigError, ModelConfig
from train.lora import apply_lora
from train.update import reference_context


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
