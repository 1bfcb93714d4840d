"""Multi-head / grouped-query attention over the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from engine.ops.attention import AttentionMetadata, KVWrite, paged_attention, write_kv, write_kv_pair
from engine.ops.packed_attention import packed_attention, sdpa_step


class PagedAttention(nn.Module):
    """Writes this step's K/V into the cache, then attends over each request's cache.
    The runner binds `k_cache`/`v_cache` ([num_blocks, block_size, kv_heads, dim] views),
    and `flashinfer` (one FlashInferAttention shared by the layers) when that attention
    backend is chosen and takes the layer."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 v_head_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.flashinfer = None
        self.sdpa_prompts = True     # whole-prompt steps through SDPA on CUDA (off: TRITON_ATTN)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                meta: AttentionMetadata, written: bool = False) -> torch.Tensor:
        """q [T, Hq, D]; k [T, Hkv, D]; v [T, Hkv, Dv], or None when V is a prefix of
        the K entry (MLA latent cache) -> [T, Hq, Dv]. written: the rotary kernel already
        stored k and v (cache_write)."""
        if not written:
            self.write(k, v, meta)
        if v is not None:
            if self.flashinfer is not None:
                return self.flashinfer.attend(q, self.k_cache, self.v_cache, meta)
            packed = sdpa_step(meta, q.device) if self.sdpa_prompts else None
            if packed is not None:     # prompts with no cached context: their K/V are this step's
                return packed_attention(q, k, v, packed, self.scale, impl="sdpa")
        return self.attend(q, meta)

    def cache_write(self, v: torch.Tensor, meta) -> KVWrite | None:
        """This step's K/V store for the rotary kernel to fuse (None: this call writes no
        paged cache)."""
        return KVWrite(self.k_cache, self.v_cache, v, meta.slot_mapping, meta.block_size)

    def write(self, k: torch.Tensor, v: torch.Tensor | None, meta: AttentionMetadata) -> None:
        if v is None:
            write_kv(self.k_cache, k, meta.slot_mapping, meta.block_size)
        else:
            write_kv_pair(self.k_cache, self.v_cache, k, v, meta.slot_mapping, meta.block_size)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata, q_rope: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the cache; q_rope: the query's last dims apart (paged_attention)."""
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, q_rope=q_rope)
