"""Paged attention over a block-table KV cache (reference implementation).

Tokens of all requests are packed along one axis; request i owns query rows
query_start_loc[i]:query_start_loc[i+1] and attends, causally, to the first
seq_lens[i] tokens of its cache. The cache views are [num_blocks, block_size,
kv_heads, dim] with arbitrary strides (the engine keeps a block's layers together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.kernels import KERNEL_DTYPES, unsupported, use_triton

MAX_TRITON_HEAD_DIM = 1024


def _cache_problem(cache: torch.Tensor, values: torch.Tensor) -> str | None:
    if cache.dtype not in KERNEL_DTYPES or values.dtype not in KERNEL_DTYPES:
        return f"dtypes {values.dtype} -> {cache.dtype}"
    if cache.stride(-1) != 1:
        return "a cache whose rows are not contiguous"
    return None


def _attention_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       q_rope: torch.Tensor | None = None) -> str | None:
    if q_rope is not None and q_rope.dtype != q.dtype:
        return f"dtypes q {q.dtype}, q_rope {q_rope.dtype}"
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in KERNEL_DTYPES:
        return f"dtypes q {q.dtype}, cache {k_cache.dtype}"
    if max(k_cache.shape[-1], v_cache.shape[-1]) > MAX_TRITON_HEAD_DIM:
        return f"head dims above {MAX_TRITON_HEAD_DIM}"
    if q.shape[1] % k_cache.shape[2]:
        return "query heads that are not a multiple of the KV heads"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "a cache whose rows are not contiguous"
    return None


@dataclass
class AttentionMetadata:
    num_reqs: int
    query_start_loc: torch.Tensor   # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor          # [num_reqs] int32, device
    block_table: torch.Tensor       # [num_reqs, max_blocks] int32, device
    slot_mapping: torch.Tensor      # [num_tokens] int64, device; -1 = padding, not written
    block_size: int
    # Host copies for the reference path and for launch grids (known to the scheduler).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Computed once per step (not per layer); a CUDA graph passes upper bounds.
    max_query_len: int | None = None
    max_seq_len: int | None = None
    # Fixed split-KV count (CUDA-graph capture: the grid cannot depend on the step's
    # lengths); None lets the kernel choose from the lengths.
    num_splits: int | None = None
    # Launch plans of the Triton dispatcher, filled by the first layer of the step and
    # reused by the others (same shapes in every layer).
    plans: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_query_len is None:
            self.max_query_len = max(self.query_lens_cpu, default=0)
        if self.max_seq_len is None:
            self.max_seq_len = max(self.seq_lens_cpu, default=0)


class KVWrite(NamedTuple):
    """A step's store into the paged cache that a rotary kernel can do in its own launch:
    the rotated K goes to k_cache, `v` to v_cache (write_kv_pair's arguments)."""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    v: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int

    def problem(self, k: torch.Tensor) -> str | None:
        return _cache_problem(self.k_cache, k) or _cache_problem(self.v_cache, self.v)


def write_kv(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
             backend: str | None = None) -> None:
    if use_triton(values, backend) and not unsupported("write_kv", _cache_problem(cache, values)):
        from engine.kernels.attention import write_kv_triton
        write_kv_triton(cache, values, slot_mapping, block_size)
        return
    write_kv_ref(cache, values, slot_mapping, block_size)


def write_kv_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slot_mapping: torch.Tensor, block_size: int, backend: str | None = None) -> None:
    """write_kv of K and of V; on the device one launch for both."""
    if use_triton(k, backend) and not unsupported(
            "write_kv", KVWrite(k_cache, v_cache, v, slot_mapping, block_size).problem(k)):
        from engine.kernels.attention import write_kv_triton
        write_kv_triton(k_cache, k, slot_mapping, block_size, v_cache, v)
        return
    write_kv_ref(k_cache, k, slot_mapping, block_size)
    write_kv_ref(v_cache, v, slot_mapping, block_size)


def write_kv_ref(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor, block_size: int) -> None:
    """cache[slot // bs, slot % bs] = values, skipping padded slots (-1)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, values = slot_mapping[valid], values[valid]
    cache[slot_mapping // block_size, slot_mapping % block_size] = values.to(cache.dtype)


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one request's cache: [length, heads, dim]."""
    n_blocks = -(-length // cache.shape[1])
    return cache[block_ids[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, Dk] -> out [T, Hq, Dv]; fp32 softmax, GQA by head groups."""
    num_heads = q.shape[1]
    out = q.new_empty(q.shape[0], num_heads, v_cache.shape[-1])
    start = 0
    for i in range(meta.num_reqs):
        n, ctx = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        if n == 0:
            continue
        k = gather_context(k_cache, meta.block_table[i], ctx)
        v = gather_context(v_cache, meta.block_table[i], ctx)
        rep = num_heads // k.shape[1]
        k = k.repeat_interleave(rep, dim=1).transpose(0, 1)    # [H, ctx, Dk]
        v = v.repeat_interleave(rep, dim=1).transpose(0, 1)    # [H, ctx, Dv]
        qi = q[start:start + n].transpose(0, 1)                 # [H, n, Dk]
        scores = torch.matmul(qi, k.transpose(1, 2)) * scale    # [H, n, ctx]
        # Query j sits at position ctx - n + j and sees keys up to there.
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[start:start + n] = torch.matmul(probs, v).transpose(0, 1)
        start += n
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, backend: str | None = None,
                    q_rope: torch.Tensor | None = None) -> torch.Tensor:
    """q_rope: the query's last dims passed apart (MLA's rotated rope part): attention of
    cat([q, q_rope], -1), which the kernel reads in place when K's tail tile is q_rope's
    width (576 = 512 + 64), saving the cat's launch."""
    if use_triton(q, backend) and not unsupported("paged_attention", _attention_problem(q, k_cache, v_cache, q_rope)):
        # Reads query_start_loc / seq_lens / block_table on the device; the host lists
        # only size the launch grid.
        from engine.kernels.attention import head_split, paged_attention_triton
        if q_rope is not None and head_split(k_cache.shape[-1]) != (q.shape[-1], q_rope.shape[-1]):
            q, q_rope = torch.cat([q, q_rope], dim=-1), None
        return paged_attention_triton(q, k_cache, v_cache, meta, scale, q_rope=q_rope)
    if q_rope is not None:
        q = torch.cat([q, q_rope], dim=-1)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
