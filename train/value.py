"""PPO's critic: a value head on the policy's last hidden state (sharing the trunk, as is standard for small
models; a separate critic would double memory for little gain at this scale)."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """hidden (B, T, H) -> values (B, T). Zero-initialised output, so PPO starts from V = 0 and the first
    advantages are the plain returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)
