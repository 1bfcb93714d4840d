"""Multi-head latent attention (DeepSeek-V2/V3) over a compressed latent cache.

The cache holds, per token, the normalised KV latent c (kv_lora_rank) and the rotated
shared key k_pe (qk_rope_head_dim): one 576-wide entry for the real models. Attention
runs with the up-projection absorbed into the query and the output, i.e. as MQA with
key [c | k_pe] and value c, so the latent is never expanded per head:
  score_h = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe,   o_h = W_UV_h (sum_t p_t c_t).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.attention import PagedAttention
from engine.layers.norm import RMSNorm
from engine.layers.params import Linear
from engine.layers.rotary import RotaryEmbedding, rope_parameters, yarn_mscale
from engine.ops.attention import AttentionMetadata


class MLAAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.rank = c.kv_lora_rank
        qk_dim = self.nope + self.rope
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, self.num_heads * qk_dim)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, self.num_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, self.rank + self.rope, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(self.rank, self.num_heads * (self.nope + self.v_dim))
        self.o_proj = Linear(self.num_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)

        params = rope_parameters(c)
        scale = qk_dim ** -0.5
        if params["rope_type"] != "default" and params.get("mscale_all_dim"):
            m = yarn_mscale(params["factor"], params["mscale_all_dim"])
            scale *= m * m
        # V3 configs say whether the rope dims are interleaved; V2 always is.
        interleaved = getattr(c, "rope_interleave", True)
        self.rotary = RotaryEmbedding(self.rope, params, c.max_position_embeddings, interleaved)
        self.attn = PagedAttention(self.num_heads, 1, self.rank + self.rope, scale, v_head_dim=self.rank)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])

        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w_kv[:, :self.nope], w_kv[:, self.nope:]
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        entry = torch.cat([latent[:, None, :], k_pe], dim=-1)           # [T, 1, rank + rope]
        o_latent = self.attn(torch.cat([q_latent, q_pe], dim=-1), entry, None, meta)
        o = torch.einsum("thr,hvr->thv", o_latent, w_uv)
        return self.o_proj(o.reshape(t, self.num_heads * self.v_dim))
