"""SwiGLU feed-forward with gate and up projections fused into one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.params import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=bias, shards=[inter, inter])
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        return self.down_proj(F.silu(h[..., :self.inter]) * h[..., self.inter:])
