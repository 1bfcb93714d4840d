"""RMSNorm, computed in float32 whatever the activation dtype; optionally fused with
the residual add before it (engine/ops/norm.py)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.params import param
from engine.ops.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = param(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual)."""
        return rms_norm(x, self.weight, self.eps, residual)
