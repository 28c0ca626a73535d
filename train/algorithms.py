"""Advantage and loss functions of GRPO and PPO, plus the importance corrections for stale rollouts.

Pure torch: tensors in, tensors out; no module state, no I/O, no distributed calls. Every loss and every
statistic is a SUM over the masked (policy) tokens, so that the caller can divide by the global count of
trained tokens and get a gradient that does not depend on how the batch was split into micro-batches and ranks.

Shapes: B sequences, T token positions. `mask` is 1 (or True) at policy tokens to train on and 0 at prompt,
padding and environment-observation tokens; any dtype is accepted and read as `mask != 0`. Values at masked-out
positions never reach a result (they are selected away before any exp), so garbage or -inf there is harmless.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from marginal_rl.train.config import AlgoConfig, PPOAlgoConfig

# ------------------------------------------------------------------------------------------------ GRPO


def grpo_advantages(rewards: Tensor, group_index: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages A_i = r_i - mean(group), divided by (std + eps): the group's std (`scale="group"`),
    the whole batch's (`"batch"`), or not at all (`"none"`), as TRL's `scale_rewards`.

    GRPO, Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, section 4.1.2 (outcome supervision). The std is
    the unbiased one (n - 1 in the denominator) and eps = 1e-4 is added to it, as TRL's GRPOTrainer does, so a
    vanilla run matches TRL. `"none"` is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", arXiv
    2503.20783), which drops the std division because it up-weights near-uniform groups; `"batch"` is the batch-level
    scaling of Hu et al. 2025 (REINFORCE++, arXiv 2501.03262), which TRL offers too.

    A group with one member, or whose rewards are all equal, gets exactly 0: it carries no relative signal
    (the equality test is exact, so 0.1 + 0.1 + 0.1 rounding cannot leak a 1e-17 advantage through 1 / eps).

    rewards: (N,) float. group_index: (N,) integer group ids, any values (need not be contiguous or sorted).
    Returns (N,) advantages in the dtype of `rewards`, detached.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"expected rewards and group_index of the same shape (N,), got {tuple(rewards.shape)} "
            f"and {tuple(group_index.shape)}"
        )
    if rewards.numel() == 0:
        return rewards.detach().clone()
    r = rewards.detach().double()
    _, g = torch.unique(group_index, return_inverse=True)  # contiguous ids 0..G-1
    num_groups = int(g.max()) + 1
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, g, r) / count
    centred = r - mean[g]
    adv = centred
    if scale == "group":
        sq = torch.zeros_like(count).index_add_(0, g, centred * centred)
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        adv = centred / (std[g] + eps)
    elif scale == "batch":
        adv = centred / ((r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)) + eps)
    elif scale != "none":
        raise ValueError(f"scale: expected group, batch or none, got {scale!r}")
    hi = torch.full_like(count, -math.inf).scatter_reduce(0, g, r, reduce="amax")
    lo = torch.full_like(count, math.inf).scatter_reduce(0, g, r, reduce="amin")
    no_signal = (hi == lo)[g]  # includes every singleton group
    return torch.where(no_signal, torch.zeros_like(adv), adv).to(rewards.dtype)


def logprobs_from_logits(logits: Tensor, ids: Tensor, temperature: float,
                         with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """(B, L-1) log-probabilities of each next token under softmax(logits / temperature), as the sampler drew them;
    with `with_entropy`, also the (B, L-1) entropy of that distribution at each position (detached, nats).
    logits: (B, L, V), position j scoring token j + 1; ids: (B, L)."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, L-1, V)
    token_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_lp
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return token_lp, entropy


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """(B,) per-sequence or (B, T) per-token advantages as (B, T)."""
    adv = advantages.detach().to(like.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    return adv.expand_as(like)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, summed over masked tokens: sum_t -min(rho_t A_t, clip(rho_t, 1-lo, 1+hi) A_t) w_t.

    rho_t = exp(logprobs - old_logprobs). Clipped surrogate: Schulman et al. 2017, PPO, arXiv 1707.06347, as
    used by GRPO (arXiv 2402.03300). The asymmetric range (clip_high > clip_low) is DAPO's clip-higher
    (Yu et al. 2025, arXiv 2503.14476), which leaves room for low-probability tokens to grow. Summing over
    tokens and dividing by the global token count in the caller is DAPO's token-level loss.

    `is_weights` (B, T), when given, multiplies each token's loss as a constant (detached): the truncated
    importance-sampling correction for rollouts generated by a stale or numerically different behaviour policy
    (see `truncated_is_weights`).

    logprobs (B, T) with grad; old_logprobs (B, T); advantages (B,) or (B, T); mask (B, T).
    Returns (loss_sum, stats). loss_sum is a scalar; an empty mask gives 0 that still backpropagates (zero grad).
    stats are detached SUMS over masked tokens, for a global reduction by the caller:
      tokens               number of masked tokens
      clipped_tokens       tokens whose gradient the clip zeroes (= clipped_low_tokens + clipped_high_tokens)
      clipped_low_tokens   rho < 1 - clip_low with A < 0
      clipped_high_tokens  rho > 1 + clip_high with A > 0
    """
    m = _as_bool(mask)
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # (B, T), exactly 1 at masked-out positions
    adv = _token_advantages(advantages, ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss_sum = torch.where(m, per_token, torch.zeros_like(per_token)).sum()

    with torch.no_grad():
        mf = m.to(ratio.dtype)
        low = (ratio < 1.0 - clip_low) & (adv < 0) & m
        high = (ratio > 1.0 + clip_high) & (adv > 0) & m
        stats = {
            "tokens": mf.sum(),
            "clipped_tokens": (low | high).to(mf.dtype).sum(),
            "clipped_low_tokens": low.to(mf.dtype).sum(),
            "clipped_high_tokens": high.to(mf.dtype).sum(),
        }
    return loss_sum, stats


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Sum over masked tokens of the k3 estimator of KL(pi || pi_ref): exp(ref - lp) - (ref - lp) - 1.

    Unbiased for samples drawn from pi and non-negative per token (Schulman 2020, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html); the form of GRPO's KL term (arXiv 2402.03300, eq. 4).
    logprobs (B, T) with grad; ref_logprobs (B, T) (detached here); mask (B, T); `weights` (B, T), when given,
    multiplies each token's term (a loss type's weights). Returns a scalar sum.
    """
    m = _as_bool(mask)
    d = torch.where(m, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))  # 0 -> k3 = 0 when masked out
    k3 = torch.exp(d) - d - 1.0
    return (k3 if weights is None else k3 * weights).sum()


# ------------------------------------------------------------------------------------------------ PPO


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, *, logprobs: torch.Tensor | None = None,
                  ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """(B, T) per-token rewards for GAE: each sequence's reward on its LAST policy token (the terminal reward),
    minus, with kl_coef > 0, the per-token KL penalty kl_coef * (logprob - ref_logprob) on every policy token
    (the InstructGPT form, Ouyang et al. 2022, arXiv 2203.02155; use it instead of, not with, a KL term in the loss).

    rewards (B,); mask (B, T) 1 on policy tokens (observation tokens in between are 0); logprobs, ref_logprobs (B, T).
    A row with no policy token gets no reward. Returns float32, detached.
    """
    m = mask > 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,) -1: no policy token
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = (last >= 0).nonzero(as_tuple=True)[0]
    out[rows, last[rows]] = rewards.detach().float()[rows]
    if kl_coef > 0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("token_rewards: kl_coef > 0 needs logprobs and ref_logprobs")
        kl = (logprobs.detach() - ref_logprobs.detach()).float()
        out = out - kl_coef * torch.where(m, kl, torch.zeros_like(kl))
    return out


@torch.no_grad()
def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the policy tokens of each sequence (Schulman et al. 2015,
    "High-dimensional continuous control using GAE", arXiv 1506.02438).

    The recursion runs over masked (policy) positions only: an environment observation between two policy
    tokens is skipped, so the "next state" of a policy token is the next policy token, as in multi-turn agents
    (its reward, if any, is ignored: put rewards on policy tokens). After the last policy token the episode is
    terminal (V = 0). With p_1 < ... < p_k the masked positions of a row:
        delta_j = r[p_j] + gamma * V[p_{j+1}] - V[p_j]        (V[p_{k+1}] = 0)
        A_j     = delta_j + gamma * lam * A_{j+1}              (A_{k+1} = 0)
        R_j     = A_j + V[p_j]
    token_rewards, values, mask: (B, T). Returns (advantages, returns), (B, T), detached, 0 where masked out.
    """
    m = _as_bool(mask)
    r = token_rewards.to(values.dtype)
    v = values.detach()
    adv = torch.zeros_like(v)
    next_v = torch.zeros_like(v[:, 0])  # (B,)
    next_a = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        mt = m[:, t]
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[:, t] = torch.where(mt, a, torch.zeros_like(a))
        next_v = torch.where(mt, v[:, t], next_v)
        next_a = torch.where(mt, a, next_a)
    returns = torch.where(m, adv + v, torch.zeros_like(v))
    return adv, returns


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float,
                       weights: Tensor | None = None) -> Tensor:
    """PPO's clipped value loss, summed over masked tokens: sum_t 0.5 max((v - R)^2, (v_clip - R)^2),
    v_clip = old_v + clamp(v - old_v, -clip, clip) (the PPO2 baselines form; Schulman et al. 2017, arXiv 1707.06347).

    values (B, T) with grad; old_values, returns (B, T) (detached here); mask (B, T); `weights` (B, T), when given,
    multiplies each token's term. Returns a scalar sum.
    """
    m = _as_bool(mask)
    old = old_values.detach()
    ret = returns.detach()
    v_clip = old + torch.clamp(values - old, -clip, clip)
    per_token = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
    if weights is not None:
        per_token = per_token * weights
    return torch.where(m, per_token, torch.zeros_like(per_token)).sum()


# ------------------------------------------------------------------------------------------------ stale rollouts


@torch.no_grad()
def truncated_is_weights(
    prox_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, level: str = "token", cap: float = 2.0
) -> Tensor:
    """Truncated importance weights min(pi_prox / pi_behav, cap), detached, per token or per sequence.

    Corrects for rollouts sampled by a behaviour policy that differs from the one the PPO ratio is taken
    against (an older policy version, or the inference engine's numerics): truncated importance sampling as
    in IMPALA's V-trace (Espeholt et al. 2018, arXiv 1802.01561) and TIS (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training", fengyao.notion.site/off-policy-rl).

    level="token":    w_t = min(exp(prox_t - behav_t), cap)
    level="sequence": w_t = min(exp(sum over the row's masked s of (prox_s - behav_s)), cap) for every token t
    Computed in log space, so a large log-ratio caps instead of overflowing. prox, behaviour, mask: (B, T).
    Returns (B, T) weights; 0 where masked out (those tokens are not trained on).
    """
    m = _as_bool(mask)
    if cap <= 0:
        raise ValueError(f"cap: expected a number > 0, got {cap}")
    log_ratio = torch.where(m, prox_logprobs - behavior_logprobs, torch.zeros_like(prox_logprobs))
    if level == "token":
        log_w = log_ratio
    elif level == "sequence":
        log_w = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
    else:
        raise ValueError(f"level: expected 'token' or 'sequence', got {level!r}")
    w = torch.exp(torch.clamp(log_w, max=math.log(cap)))
    return torch.where(m, w, torch.zeros_like(w))


@torch.no_grad()
def staleness_stats(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    *,
    advantages: Tensor | None = None,
) -> dict[str, Tensor]:
    """How far the current policy has drifted from the behaviour policy, as SUMS over masked tokens.

    rho_t = exp(logprobs_t - behavior_logprobs_t) = pi_current / pi_behaviour on the behaviour's own samples.
      tokens               number of masked tokens
      kl_k3_sum            sum of rho - 1 - log rho: k3 estimate of KL(behaviour || current) (Schulman 2020)
      ratio_sum            sum of rho
      ratio_sq_sum         sum of rho^2 (std of rho = sqrt(ratio_sq_sum/n - (ratio_sum/n)^2))
      clip_zeroed_tokens   only with `advantages` (B,) or (B, T): tokens whose gradient the clip does zero
                           (rho > 1 + clip_high with A > 0, or rho < 1 - clip_low with A < 0)
    """
    m = _as_bool(mask)
    lr = torch.where(m, logprobs - behavior_logprobs, torch.zeros_like(logprobs)).detach()
    rho = torch.exp(lr)
    mf = m.to(rho.dtype)
    above = (rho > 1.0 + clip_high) & m
    below = (rho < 1.0 - clip_low) & m
    stats = {
        "tokens": mf.sum(),
        "kl_k3_sum": ((rho - 1.0 - lr) * mf).sum(),
        "ratio_sum": (rho * mf).sum(),
        "ratio_sq_sum": (rho * rho * mf).sum(),
    }
    if advantages is not None:
        adv = _token_advantages(advantages, rho)
        stats["clip_zeroed_tokens"] = ((above & (adv > 0)) | (below & (adv < 0))).to(rho.dtype).sum()
    return stats


# ------------------------------------------------------------------------------------------------ loss types


def dapo_weights(mask: Tensor, *, tokens: float, sequences: float, max_length: int) -> tuple[Tensor | None, float]:
    """`dapo` (DAPO, arXiv 2503.14476; TRL's default): Σ_i Σ_t l_it / (tokens in the whole batch). Every token weighs
    the same, so a long completion is not down-weighted."""
    return None, tokens


def grpo_weights(mask: Tensor, *, tokens: float, sequences: float, max_length: int) -> tuple[Tensor | None, float]:
    """`grpo` (the DeepSeekMath objective, arXiv 2402.03300): Σ_i (Σ_t l_it / |o_i|) / (sequences in the batch), each
    completion's token mean, then the mean over completions; a row with no policy token counts |o| = 1."""
    m = _as_bool(mask).to(torch.float32)
    return m / m.sum(-1, keepdim=True).clamp(min=1.0), sequences


def dr_grpo_weights(mask: Tensor, *, tokens: float, sequences: float, max_length: int) -> tuple[Tensor | None, float]:
    """`dr_grpo` (Dr. GRPO, arXiv 2503.20783): Σ_i Σ_t l_it / (sequences × max_length), a constant that does not
    depend on the completions' lengths (TRL: max_completion_length; here rollout.max_new_tokens)."""
    return None, sequences * max_length


# A loss type (`algo.loss_type`): how per-token losses become the step's loss, as (per-token weights of a micro-batch
# or None for all 1, the normaliser of the whole batch). The step's loss is Σ over every micro-batch and rank of
# Σ_t w_t·l_t, divided by the normaliser, so the split of the batch never changes it.
LOSS_TYPES = {"dapo": dapo_weights, "grpo": grpo_weights, "dr_grpo": dr_grpo_weights}


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, *, tokens: float, sequences: float,
              max_length: int) -> Tensor:
    """A batch's loss under `loss_type` from its (B, T) per-token losses (what the trainer computes piecewise)."""
    weights, normaliser = LOSS_TYPES[loss_type](mask, tokens=tokens, sequences=sequences, max_length=max_length)
    terms = per_token if weights is None else per_token * weights
    return torch.where(_as_bool(mask), terms, torch.zeros_like(terms)).sum() / normaliser


def _times(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a * b


# ------------------------------------------------------------------------------------------------ the table


def group_relative_advantages(rewards: Tensor, group_index: Tensor, admitted: Tensor, cfg: AlgoConfig) -> Tensor:
    """(N,) sequence advantages of a step: group-relative (grpo_advantages, `algo.scale_rewards`) over each group's
    admitted members, 0 for the trajectories not trained on. rewards (N,), group_index (N,), admitted (N,) bool."""
    adv = torch.zeros_like(rewards)
    if admitted.any():
        adv[admitted] = grpo_advantages(rewards[admitted], group_index[admitted], scale=cfg.scale_rewards)
    return adv


class LossInputs(NamedTuple):
    """One micro-batch, as a loss function reads it. (B, T) tensors are aligned with the loss mask."""

    logprobs: Tensor  # (B, T) current policy, with grad
    old_logprobs: Tensor  # (B, T) the ratio's denominator: the proximal policy (or the behaviour, is_level=none)
    mask: Tensor  # (B, T) policy tokens to train on
    advantages: Tensor  # (B,) the step's sequence advantages (the algorithm's `advantages`)
    rewards: Tensor  # (B,)
    is_weights: Tensor | None  # (B, T) truncated importance weights, or None
    values: Tensor | None  # (B, T) value-head outputs with grad (algorithms with a value head)
    old_values: Tensor | None  # (B, T) the first epoch's values, detached
    weights: Tensor | None = None  # (B, T) the loss type's per-token weights (LOSS_TYPES), or None for all 1


def grpo_loss(x: LossInputs, cfg: AlgoConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (arXiv 2402.03300): the clipped surrogate on one sequence advantage per trajectory, no value loss.
    Returns (weighted loss sum, stats): clipped_policy_loss's stats plus policy_sum and value_sum."""
    policy_sum, stats = clipped_policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, cfg.clip_low,
                                            cfg.clip_high, is_weights=_times(x.is_weights, x.weights))
    return policy_sum, {**stats, "policy_sum": policy_sum.detach(), "value_sum": torch.zeros(())}


def ppo_loss(x: LossInputs, cfg: PPOAlgoConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO (arXiv 1707.06347): GAE over the policy tokens from the first epoch's values, with the terminal reward on
    the last policy token; the clipped surrogate on those token advantages plus vf_coef × the clipped value loss."""
    adv, returns = gae_advantages(token_rewards(x.rewards, x.mask), x.old_values, x.mask, cfg.gamma, cfg.lam)
    value_sum = clipped_value_loss(x.values, x.old_values, returns, x.mask, cfg.vf_clip, weights=x.weights)
    policy_sum, stats = clipped_policy_loss(x.logprobs, x.old_logprobs, adv, x.mask, cfg.clip_low, cfg.clip_high,
                                            is_weights=_times(x.is_weights, x.weights))
    return policy_sum + cfg.vf_coef * value_sum, {**stats, "policy_sum": policy_sum.detach(),
                                                  "value_sum": value_sum.detach()}


@dataclass(frozen=True)
class Algorithm:
    """An RL algorithm as data: what the loop computes once per step, what each micro-batch minimises."""

    advantages: Callable[[Tensor, Tensor, Tensor, AlgoConfig], Tensor]  # the step's (N,) sequence advantages
    loss: Callable[[LossInputs, AlgoConfig], tuple[Tensor, dict[str, Tensor]]]  # (loss sum over tokens, stats)
    value_head: bool  # the loss reads values: the trainer builds a value head and runs it in the forward


# A new algorithm or loss: one function above, one entry here (its name in train.config.ALGO_CONFIGS), one test.
ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(group_relative_advantages, grpo_loss, value_head=False),
    # PPO's loss computes its own token advantages (GAE); the group-relative sequence advantage is what the store
    # and the price record for its trajectories.
    "ppo": Algorithm(group_relative_advantages, ppo_loss, value_head=True),
}
