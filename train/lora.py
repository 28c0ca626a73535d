"""LoRA adapters with peft. The KL reference is then the same model with its adapters disabled: no second copy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from marginal_rl.train.config import ModelConfig


def apply_lora(model, cfg: ModelConfig):
    """Wrap `model` with LoRA adapters on `cfg.lora_target_modules` (only the adapters train); with
    `cfg.lora_r == 0` return the model unchanged (full fine-tuning)."""
    if cfg.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in names]
    if missing:
        from marginal_rl.train.config import ConfigError

        raise ConfigError(f"model.lora_target_modules: {missing} not found in the model (it has e.g. "
                          f"{sorted(n for n in names if 'proj' in n)[:8]})")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@contextmanager
def reference_logprobs_context(model) -> Iterator[torch.nn.Module]:
    """Yield the reference policy of the KL penalty for a LoRA model: the same weights with the adapters disabled,
    under no_grad (the reference is never trained). `model` is the peft model, or a DDP wrapper of it: the
    reference forward runs on the inner module, since it has no gradients for DDP to sync (a DeepSpeed engine's
    inner module likewise).

        with reference_logprobs_context(model) as ref:
            ref_lp = token_logprobs(ref, ids, attn, temperature)
    """
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    inner = model.module if wrapped else model
    if not hasattr(inner, "disable_adapter"):
        raise TypeError(f"reference_logprobs_context: expected a peft model (model.lora_r > 0), got {type(inner).__name__}")
    with torch.no_grad(), inner.disable_adapter():
        yield inner
