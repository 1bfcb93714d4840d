"""The draft head's decoder layers, built from the engine's Llama/Qwen3 pieces.

Attention runs one of two ways, chosen by what the caller passes as `meta`:
- AttentionMetadata: the engine's paged attention over the head's own KV cache (the
  runner binds `k_cache`/`v_cache` on each `self_attn.attn`, as for the target);
- a bool tensor [T, T] (True = query row may see key row): dense attention over the
  rows of this call only, differentiable. The trainer passes P-EAGLE's training mask;
  tests pass a causal mask to check both ways agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention import PagedAttention
from engine.layers.mlp import GatedMLP
from engine.layers.norm import RMSNorm
from engine.layers.params import Linear
from engine.models.base import DecoderLayer
from engine.models.llama import GQAAttention
from engine.spec.config import PEagleConfig

Meta = object   # AttentionMetadata or a bool [T, T] mask


class PagedOrDenseAttention(PagedAttention):
    def cache_write(self, v: torch.Tensor, meta):
        return None if isinstance(meta, torch.Tensor) else super().cache_write(v, meta)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, written: bool = False) -> torch.Tensor:
        if not isinstance(meta, torch.Tensor):
            return super().forward(q, k, v, meta, written)
        rep = self.num_heads // self.num_kv_heads
        qh = q.transpose(0, 1)                                   # [H, T, D]
        kh = k.repeat_interleave(rep, dim=1).transpose(0, 1)
        vh = v.repeat_interleave(rep, dim=1).transpose(0, 1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=meta, scale=self.scale)
        return out.transpose(0, 1)


def draft_attention(cfg: PEagleConfig, in_features: int) -> GQAAttention:
    """The engine's GQA attention with qkv reading `in_features` (2H in the midlayer)."""
    attn = GQAAttention(cfg.layer_config(), qk_norm=cfg.qk_norm)
    if in_features != cfg.hidden_size:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        attn.qkv_proj = Linear(in_features, q + 2 * kv, bias=cfg.attention_bias, shards=[q, kv, kv])
    attn.attn = PagedOrDenseAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.head_dim ** -0.5)
    return attn


class FirstDraftLayer(nn.Module):
    """EAGLE-3's midlayer: attention reads cat(norm(embedding), norm(fused hidden)) (2H
    wide); the residual stream starts from the fused hidden state (pre-norm, unless
    norm_before_residual)."""

    def __init__(self, cfg: PEagleConfig) -> None:
        super().__init__()
        self.norm_before_residual = cfg.norm_before_residual
        self.self_attn = draft_attention(cfg, 2 * cfg.hidden_size)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                meta: Meta) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        h = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


def later_draft_layer(cfg: PEagleConfig) -> DecoderLayer:
    """Layers 1..N-1: plain pre-norm decoder layers of width H."""
    mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
    return DecoderLayer(cfg.layer_config(), draft_attention(cfg, cfg.hidden_size), mlp)
