"""RMSNorm, computed in float32 whatever the activation dtype; optionally fused with
the residual add before it (engine/ops/norm.py)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.params import Linear, param
from engine.ops.norm import rms_norm
from engine.ops.norm_linear import norm_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = param(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual)."""
        return rms_norm(x, self.weight, self.eps, residual)

    def then_linear(self, x: torch.Tensor, residual: torch.Tensor | None, linear: Linear, store_normed: bool = False,
                    out_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """linear(norm(x + residual)) in one launch at decode sizes (engine/ops/norm_linear.py):
        (its output, x + residual or None without a residual, the normalised rows if
        store_normed)."""
        return norm_linear(x, linear.weight, linear.bias, self.weight, self.eps, residual, store_normed, out_dtype)
