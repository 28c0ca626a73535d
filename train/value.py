"""PPO's critic: a value head on the policy's last hidden state, and the per-token rewards that GAE discounts.

A head sharing the trunk (as in TRL's PPO for small models and InstructGPT-style RLHF) costs one linear layer and no
extra forward pass; a separate critic would double the memory and the forward passes for little gain at the model
sizes this project trains. The value loss then also shapes the trunk, scaled by `algo.vf_coef`.

Alignment (the same as the loss mask of train/update.py's make_batch): position j of the (B, L-1) tensors scores
token j+1, so a completion of n tokens after a prompt of p tokens occupies columns p-1 .. p+n-2; the value at column
j is V of the state that has read tokens 0..j, i.e. the state in which the policy chose token j+1.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """hidden (B, T, H) -> values (B, T). Zero-initialised, so PPO starts from V = 0 (the first advantages are the
    plain returns) and the head adds no gradient to the trunk until it has learnt something. Computed in float32
    whatever the trunk's dtype: the value regression is sensitive to bf16's 8-bit mantissa."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def forward_policy_and_values(model, value_head: nn.Module, ids: torch.Tensor, attn: torch.Tensor,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: (B, L-1) log-probabilities of each next token under softmax(logits / temperature), as the
    sampler drew them, and (B, L-1) values of the states that chose those tokens.

    ids, attn: (B, L) right-padded prompt + completion. `model` may be wrapped (DDP) so its gradients sync.
    """
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    logits = out.logits[:, :-1].float()  # (B, L-1, V): logits at j score token j+1
    logprobs = torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    values = value_head(out.hidden_states[-1][:, :-1])  # (B, L-1): the state at j chose token j+1
    return logprobs, values


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
