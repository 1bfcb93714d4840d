"""Dense decoders: Llama and Qwen3 (Qwen3 adds per-head RMSNorm on q and k)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.attention import PagedAttention
from engine.layers.mlp import GatedMLP
from engine.layers.norm import RMSNorm
from engine.layers.params import Linear
from engine.layers.rotary import RotaryEmbedding, rope_parameters
from engine.models.base import CacheLayout, CausalLM, DecoderLayer
from engine.ops.attention import AttentionMetadata


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class GQAAttention(nn.Module):
    def __init__(self, config, qk_norm: bool) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = head_dim_of(c)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(c, "attention_bias", False))
        self.qkv_proj = Linear(c.hidden_size, q_size + 2 * kv_size, bias=bias, shards=[q_size, kv_size, kv_size])
        self.o_proj = Linear(q_size, c.hidden_size, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = RotaryEmbedding(self.head_dim, rope_parameters(c), c.max_position_embeddings)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    reads_input = False     # forward_projected needs only the qkv projection

    @property
    def input_proj(self) -> Linear:
        return self.qkv_proj

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.forward_projected(self.qkv_proj(x), x, positions, meta)

    def forward_projected(self, qkv: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
        """The attention after the qkv projection (which the decoder layer may have run
        with the norm in front)."""
        t = qkv.shape[0]
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # Rotary and the cache store in one launch (the attention then skips its store).
        write = self.attn.cache_write(v, meta)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        q, k = self.rotary(positions, q, k, *norms, write=write)
        return self.o_proj(self.attn(q, k, v, meta, written=write is not None).reshape(t, -1))


def gqa_cache_layout(config) -> CacheLayout:
    return CacheLayout(config.num_hidden_layers, 2, config.num_key_value_heads, head_dim_of(config))


class LlamaForCausalLM(CausalLM):
    qk_norm = False

    def make_layer(self, index: int) -> nn.Module:
        c = self.config
        mlp = GatedMLP(c.hidden_size, c.intermediate_size, bias=bool(getattr(c, "mlp_bias", False)))
        return DecoderLayer(c, GQAAttention(c, self.qk_norm), mlp)

    def cache_layout(self) -> CacheLayout:
        return gqa_cache_layout(self.config)


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
