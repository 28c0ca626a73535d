"""Run one `train_step` on a fixed batch and save the updated weights: launched by test_invariance.py with
torchrun on 1 and on 2 processes, which must give the same update."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rollout.types import Trajectory  # noqa: E402
from train.config import load_config  # noqa: E402
from train.update import train_step  # noqa: E402


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


def updated_weights(micro_batch_tokens: int) -> dict[str, torch.Tensor]:
    accelerator = Accelerator(cpu=True)
    cfg = load_config([], [f"train.micro_batch_tokens={micro_batch_tokens}", "algo.num_iterations=2"])
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # SGD: the update is the gradient itself
    model, optimizer = accelerator.prepare(model, optimizer)
    trajs, adv = fixed_batch()
    train_step(model, optimizer, trajs, adv, cfg, pad_id=0, accelerator=accelerator)
    return {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


if __name__ == "__main__":
    weights = updated_weights(int(sys.argv[2]))
    accelerator = Accelerator(cpu=True)
    if accelerator.is_main_process:
        torch.save(weights, sys.argv[1])
    # tear the process group down before exit: a process leaving with it alive can die in its C++ destructor
    # ("terminate called without an active exception", SIGABRT), which failed this test now and then
    accelerator.wait_for_everyone()
    accelerator.end_training()
