"""Multi-head latent attention (DeepSeek-V2/V3) over a compressed latent cache.

The cache holds, per token, the normalised KV latent c (kv_lora_rank) and the rotated
shared key k_pe (qk_rope_head_dim): one 576-wide entry for the real models. Two forms
of the same attention, chosen per request:
- absorbed (decode, short chunks): the up-projection folded into the query and the
  output, i.e. MQA with key [c | k_pe] and value c, the latent never expanded per head:
    score_h = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe,   o_h = W_UV_h (sum_t p_t c_t);
- expanded (prefill): the request's whole context (cached and new) decompressed to
  per-head K = [W_UK_h c | k_pe] and V = W_UV_h c, then ordinary attention with head
  dims 192/128 instead of 576/512: per query token a quarter of the attention work at
  a far better kernel rate, for one up-projection per context token (as vLLM and SGLang).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.layers.attention import PagedAttention
from engine.layers.norm import RMSNorm
from engine.layers.params import Linear
from engine.layers.rotary import RotaryEmbedding, rope_parameters, yarn_mscale
from engine.ops.attention import AttentionMetadata, KVWrite
from engine.ops.packed_attention import context_slots, packed_attention, packed_metadata, subset_metadata

# A request with at least this many query tokens attends in the expanded form. Per
# context token the expansion costs one up-projection (~4 MFLOP at DeepSeek-V2-Lite's
# shapes) and saves ~25 kFLOP of absorbed attention per query token, at a higher kernel
# rate: it pays from a few dozen query tokens on, whatever the context length.
EXPAND_MIN_QUERY = 32


class _Group(NamedTuple):
    rows: torch.Tensor | None      # the group's token rows; None: every row of the step
    meta: AttentionMetadata        # the group's requests over the paged cache


class _Expanded(NamedTuple):
    group: _Group
    packed: AttentionMetadata      # the same requests over packed K/V
    slots: tuple[torch.Tensor, torch.Tensor] | None   # context in the cache; None: this step's tokens only


class _Split(NamedTuple):
    absorbed: _Group | None
    expanded: _Expanded | None


def split_step(meta: AttentionMetadata) -> _Split:
    """Which requests of the step attend in which form; the same for every layer."""
    long = [i for i, n in enumerate(meta.query_lens_cpu) if n >= EXPAND_MIN_QUERY]
    if not long:
        return _Split(_Group(None, meta), None)
    short = sorted(set(range(meta.num_reqs)) - set(long))
    if short:
        absorbed = _Group(*subset_metadata(meta, short))
        expanded = _Group(*subset_metadata(meta, long))
    else:
        absorbed, expanded = None, _Group(None, meta)
    m = expanded.meta
    fresh = m.query_lens_cpu == m.seq_lens_cpu
    return _Split(absorbed, _Expanded(expanded, packed_metadata(m), None if fresh else context_slots(m)))


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

    reads_input = True      # the latent projection reads the normalised input too

    @property
    def input_proj(self) -> Linear:
        """The first query projection: the decoder layer may run it with its norm in front."""
        return self.q_proj if hasattr(self, "q_proj") else self.q_a_proj

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.forward_projected(self.input_proj(x), x, positions, meta)

    def forward_projected(self, q: torch.Tensor, x: torch.Tensor, positions: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
        """q: input_proj(x), x: the normalised input."""
        t = x.shape[0]
        if not hasattr(self, "q_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(t, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        # The cache entry [latent | rotated k_pe] is stored by the rotary kernel itself.
        cache = self.attn.k_cache
        write = KVWrite(cache[..., self.rank:], cache[..., :self.rank], latent[:, None, :], meta.slot_mapping,
                        meta.block_size)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :], write=write)

        split = meta.plans.get("mla")
        if split is None:
            split = meta.plans["mla"] = split_step(meta)
        parts = []
        if split.absorbed is not None:
            rows = split.absorbed.rows
            parts.append((rows, self._absorbed(q_nope if rows is None else q_nope[rows],
                                               q_pe if rows is None else q_pe[rows], split.absorbed.meta)))
        if split.expanded is not None:
            rows = split.expanded.group.rows
            q = torch.cat([q_nope, q_pe], dim=-1)                        # the rope part rotated
            entry = torch.cat([latent[:, None, :], k_pe], dim=-1)       # [T, 1, rank + rope]
            parts.append((rows, self._expanded(q if rows is None else q[rows],
                                               entry if rows is None else entry[rows], split.expanded)))
        if len(parts) == 1:
            o = parts[0][1]
        else:
            o = q.new_empty(t, self.num_heads, self.v_dim)
            for rows, part in parts:
                o[rows] = part
        return self.o_proj(o.reshape(t, self.num_heads * self.v_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w_kv[:, :self.nope], w_kv[:, self.nope:]
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        o_latent = self.attn.attend(q_latent, meta, q_rope=q_pe)       # no cat: the kernel reads both
        return torch.einsum("thr,hvr->thv", o_latent, w_uv)

    def _expanded(self, q: torch.Tensor, entry: torch.Tensor, plan: _Expanded) -> torch.Tensor:
        """q [n, H, nope + rope] (rotated) of the group's tokens; their cache entries
        [n, 1, rank + rope] stand for the whole context when nothing was cached before."""
        if plan.slots is None:
            ctx = entry[:, 0]
        else:
            blk, off = plan.slots
            ctx = self.attn.k_cache[blk, off, 0]                       # [S, rank + rope]
        s, h = ctx.shape[0], self.num_heads
        kv = self.kv_b_proj(ctx[:, :self.rank]).view(s, h, self.nope + self.v_dim)
        k = torch.cat([kv[..., :self.nope], ctx[:, None, self.rank:].expand(s, h, self.rope)], dim=-1)
        return packed_attention(q, k, kv[..., self.nope:], plan.packed, self.attn.scale)
