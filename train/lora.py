"""LoRA adapters with peft. The KL reference is then the same model with its adapters disabled: no second copy."""

from __future__ import annotations

from train.config import ModelConfig


def apply_lora(model, cfg: ModelConfig):
    """Wrap `model` with LoRA adapters on `cfg.lora_target_modules` (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in names]
    if missing:
        from train.config import ConfigError

        raise ConfigError(f"model.lora_target_modules: {missing} not found in the model (it has e.g. "
                          f"{sorted(n for n in names if 'proj' in n)[:8]})")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)
