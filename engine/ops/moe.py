"""Mixture-of-experts compute: route tokens to experts, SwiGLU, weighted combine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import use_triton


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I];
    topk_ids/topk_weights [T, k] over the E physical experts -> [T, H].
    Experts are visited in ascending id and accumulated in that order."""
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    flat = topk_ids.flatten()
    for e in torch.unique(flat).tolist():
        token_idx, slot = torch.where(topk_ids == e)
        h = F.linear(x[token_idx], w13[e])
        h = F.silu(h[:, :inter]) * h[:, inter:]
        h = F.linear(h, w2[e]) * topk_weights[token_idx, slot, None].to(x.dtype)
        out.index_add_(0, token_idx, h)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    if use_triton(x, backend):
        # Sorts entries by expert on the device and runs grouped GEMMs: no host sync
        # (the reference's torch.unique and per-expert loop read back to the host).
        from engine.kernels.moe import fused_moe_triton
        return fused_moe_triton(x, w13, w2, topk_ids, topk_weights)
    return fused_moe_ref(x, w13, w2, topk_ids, topk_weights)
