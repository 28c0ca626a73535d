"""PPO's critic: a value head on the policy's last hidden state (the per-token rewards GAE discounts are
algorithms.token_rewards).

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

from marginal_rl.train.algorithms import logprobs_from_logits


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
                              temperature: float, *, with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """One forward pass: (B, L-1) log-probabilities of each next token under softmax(logits / temperature), as the
    sampler drew them, and (B, L-1) values of the states that chose those tokens; with `with_entropy`, also the
    (B, L-1) entropies (algorithms.logprobs_from_logits).

    ids, attn: (B, L) right-padded prompt + completion. `model` may be wrapped (DDP) so its gradients sync.
    """
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    logprobs = logprobs_from_logits(out.logits, ids, temperature, with_entropy)  # logits at j score token j+1
    values = value_head(out.hidden_states[-1][:, :-1])  # (B, L-1): the state at j chose token j+1
    return (*logprobs, values) if with_entropy else (logprobs, values)
