"""Run one `train_step` on a fixed batch and save the updated weights: launched by test_invariance.py with
torchrun on 1 and on 2 processes, which must give the same update; with DeepSpeed ZeRO-2/3 too (test_deepspeed.py).

    ddp_update.py OUT MICRO_BATCH_TOKENS [ddp|zero2|zero3] [nonfinite] [ppo]

`nonfinite`: one behaviour log-probability is -inf, so the step's statistics are non-finite while its gradients
are finite; the update must be skipped (on every rank, under every backend) and the weights left as they were.
`ppo`: PPO with its value head (a separate DDP module; under DeepSpeed a submodule of the policy), whose weights are
saved too, under the name DeepSpeed gives them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from marginal_rl.rollout.types import Trajectory
from marginal_rl.train import zero
from marginal_rl.train.config import load_config
from marginal_rl.train.update import train_step
from marginal_rl.train.value import ValueHead


def fixed_batch(n: int = 8, seed: int = 0) -> tuple[list[Trajectory], np.ndarray]:
    rng = np.random.default_rng(seed)
    trajs = []
    for i in range(n):
        p, c = int(rng.integers(2, 6)), int(rng.integers(1, 7))
        trajs.append(Trajectory(
            traj_id=f"t{i}", prompt_id=f"p{i // 4}", group_id=f"g{i // 4}", step=0, behavior_version=0,
            prompt_ids=rng.integers(3, 40, p).tolist(), completion_ids=rng.integers(3, 40, c).tolist(),
            completion_mask=[1] * c, behavior_logprobs=(-rng.random(c) * 3).tolist(), reward=float(i % 2),
            finish_reason="eos"))
    return trajs, rng.normal(size=n)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))


def build_accelerator(mode: str) -> Accelerator:
    if mode == "ddp":
        return Accelerator(cpu=True)
    # what `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml` sets for each process
    os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": mode[-1],
                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
                       "ACCELERATE_MIXED_PRECISION": "no"})
    return zero.build_accelerator(cpu=not torch.cuda.is_available())


def updated_weights(micro_batch_tokens: int, mode: str = "ddp", nonfinite: bool = False, ppo: bool = False,
                    loss_type: str = "dapo"):
    """(weights after one train_step, its metrics)."""
    accelerator = build_accelerator(mode)
    # max_grad_norm below the gradient norm (about 0.12): the update is clipped, by the engine under DeepSpeed
    cfg = load_config([], [f"train.micro_batch_tokens={micro_batch_tokens}", "algo.num_iterations=2",
                           "train.max_grad_norm=0.05", f"algo.name={'ppo' if ppo else 'grpo'}",
                           f"algo.loss_type={loss_type}"])
    if mode != "ddp":
        zero.configure(accelerator, cfg)
    model = tiny_model()
    head = ValueHead(model.config.hidden_size) if ppo else None
    params = list(model.parameters()) + (list(head.parameters()) if ppo else [])
    optimizer = torch.optim.SGD(params, lr=0.5)  # SGD: the update is the (clipped) gradient itself
    if ppo and mode != "ddp":  # as train/loop.py does
        model, optimizer = accelerator.prepare(zero.with_value_head(model, head), optimizer)
    elif ppo:
        model, head, optimizer = accelerator.prepare(model, head, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    trajs, adv = fixed_batch()
    if nonfinite:
        trajs[-1].behavior_logprobs[0] = float("-inf")  # the behaviour KL is inf; the loss and gradients are finite
    metrics = train_step(model, optimizer, trajs, adv, cfg, pad_id=0, accelerator=accelerator, value_head=head)
    weights = accelerator.get_state_dict(model) or {}  # a collective under ZeRO-3: the full weights on the main rank
    if ppo and mode == "ddp":
        weights.update({f"{zero.VALUE_HEAD}.{k}": v for k, v in accelerator.unwrap_model(head).state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in weights.items()}, metrics, accelerator


if __name__ == "__main__":
    mode = sys.argv[3] if len(sys.argv) > 3 else "ddp"
    weights, metrics, accelerator = updated_weights(int(sys.argv[2]), mode, nonfinite="nonfinite" in sys.argv[4:],
                                                    ppo="ppo" in sys.argv[4:])
    if accelerator.is_main_process:
        torch.save(weights, sys.argv[1])
        Path(sys.argv[1]).with_suffix(".json").write_text(json.dumps(metrics))
    # tear the process group down, then leave without running C++ destructors: a process leaving normally can die in
    # one of DeepSpeed's or gloo's ("terminate called without an active exception", SIGABRT) after its result is
    # written, which failed these tests now and then
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
