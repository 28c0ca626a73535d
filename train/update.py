"""One step's optimisation on the admitted trajectories: packing, micro-batches, losses, one optimiser update.

Every rank holds the same list of admitted trajectories; `pack_microbatches` gives each rank its token-balanced
share with the same number of micro-batches everywhere (so DDP/FSDP/ZeRO collectives stay in step), and every loss
is a sum over tokens divided by the GLOBAL trained-token count, so the update does not depend on how the batch
was split across micro-batches or ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from marginal_rl.rollout.types import Trajectory, TrajectoryColumns
from marginal_rl.train import zero
from marginal_rl.train.algorithms import (
    ALGORITHMS,
    LOSS_TYPES,
    LossInputs,
    kl_penalty,
    logprobs_from_logits,
    staleness_stats,
    truncated_is_weights,
)
from marginal_rl.train.config import RunConfig
from marginal_rl.train.packing import pack_microbatches, pad_batch
from marginal_rl.train.value import forward_policy_and_values

STAT_KEYS = ("loss/policy", "loss/value", "loss/kl", "loss/clip_fraction", "tokens", "kl_k3_sum", "ratio_sum",
             "ratio_sq_sum", "clip_zeroed_tokens", "clip_low_tokens", "clip_high_tokens", "entropy_sum", "ref_kl_sum")


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attn: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L-1) 1 where the target token is a policy token to train on
    old_logprobs: torch.Tensor  # (B, L-1) behaviour logprobs at target positions
    advantages: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B,)


def make_batch(trajectories: Sequence[Trajectory], advantages: Sequence[float], pad_id: int) -> Batch:
    ids, attn = pad_batch([t.prompt_ids + t.completion_ids for t in trajectories], pad_id)
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    old = torch.zeros_like(mask)
    for i, t in enumerate(trajectories):
        start = t.tokens_prompt - 1  # logits at position j predict token j + 1
        n = t.tokens_completion
        mask[i, start : start + n] = torch.tensor(t.completion_mask, dtype=mask.dtype)
        old[i, start : start + n] = torch.tensor(t.behavior_logprobs, dtype=old.dtype)
    return Batch(ids, attn, mask, old, torch.tensor(list(advantages), dtype=torch.float32),
                 torch.tensor([t.reward for t in trajectories], dtype=torch.float32))


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float, *,
                   with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L-1) log-probabilities of each next token under softmax(logits / temperature), as the sampler used (and
    the entropies, with `with_entropy`: algorithms.logprobs_from_logits)."""
    return logprobs_from_logits(model(input_ids=ids, attention_mask=attn).logits, ids, temperature, with_entropy)


def sequence_advantages(cfg: RunConfig, columns: TrajectoryColumns, admitted: np.ndarray) -> np.ndarray:
    """(N,) float64: the algorithm's sequence advantages of the step's trajectories (0 for those not trained on)."""
    rewards = torch.tensor(columns.reward, dtype=torch.float32)
    adv = ALGORITHMS[cfg.algo.name].advantages(rewards, torch.tensor(columns.group), torch.tensor(admitted), cfg.algo)
    return adv.numpy().astype(np.float64)


def train_step(model, optimizer, trajectories: Sequence[Trajectory], advantages: np.ndarray, cfg: RunConfig,
               pad_id: int, accelerator: Accelerator, *, reference=None, value_head=None) -> dict[str, float]:
    """All epochs (`algo.num_iterations`) of one step on the admitted trajectories, the same list on every rank.

    Stale samples: the first epoch's log-probabilities (before any update of this step) are the proximal policy of
    decoupled PPO; the clip acts on π/π_prox and a truncated importance weight π_prox/π_behaviour corrects for the
    behaviour policy (algo.is_level), so staleness costs no extra forward pass. Returns loss and staleness
    statistics reduced over ranks, with `optim/grad_norm` and `train/nonfinite` (1.0 when an update was skipped)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    global_tokens = sum(t.tokens_policy for t in trajectories)
    lengths = [t.tokens_prompt + t.tokens_completion for t in trajectories]
    microbatches = pack_microbatches(lengths, world, cfg.train.micro_batch_tokens)[rank]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums = dict.fromkeys(STAT_KEYS, 0.0)  # fixed keys: every rank reduces the same vector, even with no data
    proximal: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # micro-batch -> first-epoch (logprobs, values)
    grad_norm, skipped, overflow = 0.0, 0.0, 0.0
    for epoch in range(cfg.algo.num_iterations):
        finite_loss = True
        for m, mb in enumerate(microbatches):
            sync = m == len(microbatches) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                loss, stats = _microbatch(model, [trajectories[j] for j in mb], advantages[mb], cfg, pad_id,
                                          global_tokens, len(trajectories), world, accelerator, reference,
                                          value_head, proximal, m, first_epoch=epoch == 0)
                for k in STAT_KEYS:
                    sums[k] += stats.get(k, 0.0)
                if sync:  # one decision for every rank (a rank-local one would let the ranks' weights diverge)
                    finite_loss = _finite_on_every_rank(sums, accelerator)
                    if not finite_loss and zero.active(accelerator):
                        # The engine steps inside this last backward and a step cannot be undone. A NaN loss makes
                        # every gradient NaN, so the engine's overflow check skips the step and clears the
                        # gradients, as it does for a non-finite gradient norm of its own.
                        loss = loss * float("nan")
                zero.backward(loss, accelerator, boundary=sync)
        norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))  # DeepSpeed: reports
        grad_norm = float(norm)
        if math.isfinite(grad_norm) and finite_loss and not zero.step_skipped(optimizer, accelerator):
            optimizer.step()  # a no-op under DeepSpeed, whose engine has stepped in the last backward
        elif finite_loss and (accelerator.scaler is not None or zero.fp16(accelerator)):
            # fp16 mixed precision: the gradients overflowed the loss scale. The GradScaler skips this step and
            # lowers its scale (it must see the step to do so); that is its normal working, not a numerical failure.
            # DeepSpeed's fp16 engine has done the same inside backward.
            optimizer.step()
            overflow += 1.0 / cfg.algo.num_iterations
        else:
            skipped = 1.0  # a non-finite loss or gradient: this update is dropped, the caller counts them in a row
        optimizer.zero_grad(set_to_none=True)
    total = _reduce(sums, accelerator)
    n = max(total.pop("tokens", 0.0), 1.0)  # first-epoch tokens, for the staleness means
    iters = cfg.algo.num_iterations
    out = {k: v / iters for k, v in total.items() if k.startswith("loss/")}
    mean_r = total.get("ratio_sum", 0.0) / n
    low, high = total["clip_low_tokens"] / (n * iters), total["clip_high_tokens"] / (n * iters)
    out.update({  # TRL's names for what both compute (docs/metrics.md)
        "entropy": total["entropy_sum"] / n, "clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
        "clip_ratio/region_mean": low + high,
        **({"kl": total["ref_kl_sum"] / (n * iters)} if cfg.algo.kl_coef > 0 else {}),
    })
    out.update({
        "train/behaviour_kl": total.get("kl_k3_sum", 0.0) / n,
        "train/ratio_mean": mean_r,
        "train/ratio_std": math.sqrt(max(total.get("ratio_sq_sum", 0.0) / n - mean_r**2, 0.0)),
        "train/clip_zeroed_fraction": total.get("clip_zeroed_tokens", 0.0) / n,
        "optim/grad_norm": grad_norm, "train/nonfinite": skipped, "train/fp16_overflow": overflow,
    })
    return out


def _microbatch(model, trajectories: Sequence[Trajectory], advantages: np.ndarray, cfg: RunConfig, pad_id: int,
                global_tokens: int, global_sequences: int, world: int, accelerator: Accelerator, reference, value_head,
                proximal: dict, key: int, first_epoch: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward of one micro-batch: its loss, to backward, and its sums for the step's statistics."""
    dev = accelerator.device
    if not trajectories:  # this rank has fewer micro-batches' worth of data: a zero loss keeps DDP/ZeRO in step
        if zero.active(accelerator):  # a real forward: under ZeRO-3 every forward gathers weights collectively
            return model(input_ids=torch.full((1, 1), pad_id, device=dev)).logits.float().sum() * 0.0, {}
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0, {}
    algo = ALGORITHMS[cfg.algo.name]
    b = make_batch(trajectories, advantages, pad_id)
    ids, attn, mask, behaviour = b.ids.to(dev), b.attn.to(dev), b.mask.to(dev), b.old_logprobs.to(dev)
    # the entropy is a first-epoch statistic: later epochs skip its pass over the vocabulary
    if algo.value_head:
        res = forward_policy_and_values(model, value_head, ids, attn, cfg.rollout.temperature, with_entropy=first_epoch)
        lp, values, entropy = (res[0], res[2], res[1]) if first_epoch else (*res, None)
    else:
        res = token_logprobs(model, ids, attn, cfg.rollout.temperature, with_entropy=first_epoch)
        (lp, entropy), values = (res if first_epoch else (res, None)), None
    stats: dict[str, float] = {}
    if first_epoch:
        proximal[key] = (lp.detach(), values.detach() if values is not None else None)
        st = staleness_stats(lp.detach(), behaviour, mask, cfg.algo.clip_low, cfg.algo.clip_high,
                             advantages=b.advantages.to(dev))
        stats = {k: float(v) for k, v in st.items()}
        stats["entropy_sum"] = float((entropy * mask).sum())
    prox_lp, old_values = proximal[key]
    if cfg.algo.is_level == "none":
        old, is_w = behaviour, None  # classic PPO: the clip acts on π / π_behaviour
    else:
        old, is_w = prox_lp, truncated_is_weights(prox_lp, behaviour, mask, cfg.algo.is_level, cfg.algo.is_cap)
    weights, norm = LOSS_TYPES[cfg.algo.loss_type](mask, tokens=global_tokens, sequences=global_sequences,
                                                   max_length=cfg.rollout.max_new_tokens)
    loss_sum, parts = algo.loss(LossInputs(lp, old, mask, b.advantages.to(dev), b.rewards.to(dev), is_w, values,
                                           old_values, weights), cfg.algo)
    kl_sum = torch.zeros((), device=dev)
    if cfg.algo.kl_coef > 0:
        with torch.no_grad(), reference_context(model, reference) as ref_model:
            ref_lp = token_logprobs(ref_model, ids, attn, cfg.rollout.temperature)
        kl_sum = kl_penalty(lp, ref_lp, mask, weights)
        stats["ref_kl_sum"] = float(kl_penalty(lp.detach(), ref_lp, mask)) if weights is not None else float(kl_sum)
    # DDP averages gradients over ranks: scale by world so the update is the loss type's sum over the whole batch /
    # its normaliser. DeepSpeed averages over ranks too (its gradient_accumulation_steps is held at 1).
    loss = (loss_sum + cfg.algo.kl_coef * kl_sum) * world / norm
    stats.update({"loss/policy": parts["policy_sum"].item() / norm, "loss/value": parts["value_sum"].item() / norm,
                  "loss/kl": kl_sum.item() / norm,
                  "loss/clip_fraction": float(parts["clipped_tokens"]) / global_tokens,
                  "clip_low_tokens": float(parts["clipped_low_tokens"]),
                  "clip_high_tokens": float(parts["clipped_high_tokens"])})
    return loss, stats


def reference_context(model, reference):
    """The reference policy of the KL penalty: the frozen copy, or with LoRA the same model with adapters disabled."""
    if reference is not None:
        return nullcontext(reference)
    from marginal_rl.train.lora import reference_logprobs_context

    return reference_logprobs_context(model)


@torch.no_grad()
def measure_drift(model, trajectories: Sequence[Trajectory], version: int, cfg: RunConfig, pad_id: int,
                  device) -> float | None:
    """Mean per-token KL(behaviour || current) on up to `budget.drift_probe` of the step's trained trajectories,
    per policy version between them: the drift rate at which the budget depreciates stale evidence. None when
    nothing was probed (`budget.drift_probe=0`): the budget then keeps its prior instead of hearing "no drift"."""
    probe = list(trajectories[: cfg.budget.drift_probe])
    if not probe:
        return None
    b = make_batch(probe, [0.0] * len(probe), pad_id)
    lp = token_logprobs(model, b.ids.to(device), b.attn.to(device), cfg.rollout.temperature)
    mask, old = b.mask.to(device), b.old_logprobs.to(device)
    # k3 with r = π_current / π_behaviour on samples from the behaviour policy: KL(behaviour || current)
    kl = kl_penalty(old, lp, mask).item() / max(mask.sum().item(), 1.0)
    return kl / max(float(np.mean([version - t.behavior_version for t in probe])), 1.0)


def _finite_on_every_rank(stats: dict[str, float], accelerator: Accelerator) -> bool:
    bad = torch.tensor([float(not all(math.isfinite(v) for v in stats.values()))], device=accelerator.device)
    return accelerator.num_processes == 1 or accelerator.reduce(bad, reduction="sum").item() == 0


def _reduce(stats: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    keys = sorted(stats)  # every rank must send its values in the same order
    if accelerator.num_processes == 1:
        return {k: stats[k] for k in keys}
    t = torch.tensor([stats[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    return dict(zip(keys, accelerator.reduce(t, reduction="sum").tolist(), strict=True))
