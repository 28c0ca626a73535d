"""DeepSpeed ZeRO-2/3 through accelerate: what the trainer sets and gathers so that the engine runs its update.

The engine replaces the optimiser: it reduces and shards the gradients, clips them (`gradient_clipping`), steps and
zeroes them inside `backward` at a gradient-accumulation boundary. The trainer accumulates a variable number of
token-balanced micro-batches per update, so `train/update.py` drives the boundary itself (the last micro-batch of an
epoch, see `backward`), and here the engine is configured so that its update equals the DDP update: no loss
division by gradient_accumulation_steps (held at 1), clipping at `train.max_grad_norm`.

`import deepspeed` happens only under DeepSpeed: it is an optional extra (`pip install -e .[deepspeed]`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from marginal_rl.train.config import ConfigError, RunConfig


def requested() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (it sets this for every process it starts)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(cpu: bool) -> Accelerator:
    """The Accelerator of a DeepSpeed launch. On a machine without CUDA, accelerate finds no communication backend by
    itself (and `cpu=True` would silently drop DeepSpeed for plain gloo DDP), so gloo is named explicitly; DeepSpeed
    then runs on its CPU accelerator (`DS_ACCELERATOR=cpu`, picked automatically when there is no GPU)."""
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        raise ConfigError("ACCELERATE_USE_CPU=true turns a DeepSpeed launch into plain CPU DDP; unset it "
                          "(on a CPU-only machine DeepSpeed runs on its CPU accelerator: DS_ACCELERATOR=cpu)")
    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu else [])


def active(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def stage(accelerator: Accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if active(accelerator) else 0


def configure(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Refuse what is not supported under DeepSpeed and fill the config keys accelerate cannot fill without a
    dataloader, before `accelerator.prepare` builds the engine."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    if cfg.train.save_every or cfg.train.resume_from:
        raise ConfigError("train.save_every / train.resume_from: checkpoints hold full weights and optimiser state "
                          "from the main process, but ZeRO shards them; set train.save_every=0 under DeepSpeed")
    if plugin.zero_stage == 3 and plugin.zero3_init_flag:
        raise ConfigError("zero3_init_flag: true asks for the weights to be partitioned while they load; the trainer "
                          "loads them whole on every rank (the KL reference and the rollout snapshot are copies made "
                          "before accelerator.prepare, which then partitions them): set it to false")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ConfigError(f"deepspeed gradient_accumulation_steps: {gas}; the trainer accumulates its own "
                          "micro-batches and marks the boundary itself: set it to 1")
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != cfg.train.max_grad_norm:
        raise ConfigError(f"deepspeed gradient_clipping: {clip} differs from train.max_grad_norm="
                          f"{cfg.train.max_grad_norm}; leave it out (auto): the trainer sets it")
    ds["gradient_accumulation_steps"] = 1  # else the engine divides every loss by it in backward
    ds["gradient_clipping"] = cfg.train.max_grad_norm  # the engine clips (0 = off); clip_grad_norm_ only reports
    # micro-batches are token-balanced, not counted in samples: this number only feeds DeepSpeed's throughput logs
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = 1
    if ds.get("bf16", {}).get("enabled") is True:  # the non-finite skip (train/update.py) relies on this check
        ds["bf16"]["check_grad_overflow"] = True
    if plugin.zero_stage == 3:  # `final/` gathers the full weights from the shards (accelerator.get_state_dict)
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        hide_from_transformers()


def hide_from_transformers() -> None:
    """Under ZeRO-3 accelerate registers its DeepSpeed config with transformers (whatever zero3_init_flag says), and
    transformers then (a) builds every model inside `zero.Init`, partitioning the weights as they load, so the KL
    reference and the rollout snapshot (copies made before `accelerator.prepare`) would be empty; and (b) generates
    with `synced_gpus`, an all-reduce per token, which deadlocks against the training collectives when the async
    producer generates in its thread. The trainer needs neither: it loads whole weights (prepare partitions them)
    and generates from whole weights (the snapshot, or the gathered policy: `generation_context`)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


VALUE_HEAD = "rl_value_head"  # PPO's value head, as a submodule of the policy under DeepSpeed


def with_value_head(model: torch.nn.Module, value_head: torch.nn.Module) -> torch.nn.Module:
    """PPO under DeepSpeed: the engine trains one module, so the value head becomes a submodule of the policy (its
    parameters are then sharded, reduced, clipped and stepped with the policy's). The policy's forward never calls
    it; `forward_policy_and_values` calls it on the last hidden state as without DeepSpeed (under ZeRO-3 its hooks gather
    its weights). `final/` leaves it out (`policy_weights`)."""
    model.add_module(VALUE_HEAD, value_head)
    return model


def policy_weights(state_dict: dict | None) -> dict | None:
    """The policy's weights without the value head a DeepSpeed PPO run attached to it."""
    if state_dict is None:
        return None
    return {k: v for k, v in state_dict.items() if not k.startswith(VALUE_HEAD + ".")}


def backward(loss: torch.Tensor, accelerator: Accelerator, boundary: bool) -> None:
    """`accelerator.backward`, except that under DeepSpeed the engine's gradient-accumulation boundary is this
    epoch's last micro-batch (`boundary`), whatever accelerate's own step counter says: the engine then reduces the
    gradients, clips, steps and zeroes them once per update, after every micro-batch's gradients are in."""
    if not active(accelerator):
        accelerator.backward(loss)
    else:  # accelerator.backward passes accelerator.sync_gradients as the boundary; this passes ours
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=boundary)


def fp16(accelerator: Accelerator) -> bool:
    """DeepSpeed's own fp16 loss scaler (accelerate's GradScaler is not used under DeepSpeed)."""
    return active(accelerator) and accelerator.deepspeed_engine_wrapped.engine.fp16_enabled()


def step_skipped(optimizer, accelerator: Accelerator) -> bool:
    """Whether the engine skipped the step it just took in backward: a non-finite gradient norm (ZeRO's overflow
    check). Only under DeepSpeed: elsewhere `step_was_skipped` describes the previous step."""
    return active(accelerator) and optimizer.step_was_skipped


def gathered_parameters(model, accelerator: Accelerator):
    """Under ZeRO-3 every weight of `model` (the engine) gathered on every rank, read-only, for the duration;
    a no-op otherwise. A collective: every rank must enter it."""
    if stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


@contextmanager
def generation_context(model, accelerator: Accelerator):
    """Generating with the trained model under ZeRO-3: its weights gathered, and the engine's per-module hooks
    (which would fetch and release the shards around every forward, a collective that ranks generating different
    numbers of tokens cannot keep in step) removed for the duration; TRL's helpers do exactly this for its trainers."""
    if stage(accelerator) != 3:
        yield
        return
    from trl.models.utils import add_hooks, remove_hooks

    with gathered_parameters(model, accelerator):
        remove_hooks(model)
        try:
            yield
        finally:
            add_hooks(model)
