"""Causal attention over packed K/V: request i's keys are rows kv_start[i]:kv_start[i] +
seq_lens[i] of K [S, kv_heads, d_qk] and V [S, kv_heads, d_v], its queries the last
query_lens[i] positions of that span (MLA prefill over decompressed keys and values).

Implementations, fastest first where the shapes allow:
- torch SDPA (cuDNN, then the memory-efficient kernel) when every request is a whole
  prompt of one length (no cached context): a plain batched causal attention;
- the engine's Triton attention kernel, which reads packed K/V as a cache of one-token
  blocks whose block table is each request's run of rows (any lengths, any context);
- the torch reference (CPU, or shapes no kernel takes).
"""

from __future__ import annotations

import itertools

import torch

from engine.kernels import unsupported, use_triton
from engine.ops.attention import AttentionMetadata, _attention_problem, paged_attention_ref


def subset_metadata(meta: AttentionMetadata, reqs: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
    """The token rows of requests `reqs` (in order) and the metadata of those requests
    alone, for attention over the same paged cache."""
    dev = meta.query_start_loc.device
    q_lens = [meta.query_lens_cpu[i] for i in reqs]
    all_starts = [0, *itertools.accumulate(meta.query_lens_cpu)]
    starts = [all_starts[i] for i in reqs]
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, q_lens)]).to(dev, non_blocking=True)
    idx = torch.tensor(reqs, dtype=torch.long).to(dev, non_blocking=True)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32).to(dev, non_blocking=True)
    sub = AttentionMetadata(len(reqs), qsl, meta.seq_lens[idx], meta.block_table[idx], meta.slot_mapping[rows],
                            meta.block_size, q_lens, [meta.seq_lens_cpu[i] for i in reqs])
    return rows, sub


def context_slots(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Block and offset in the paged cache of every context token (cached and new) of
    every request, requests one after another: [S] each, S = sum(seq_lens)."""
    S = sum(meta.seq_lens_cpu)
    dev = meta.seq_lens.device
    lens = meta.seq_lens.long()
    req = torch.repeat_interleave(torch.arange(meta.num_reqs, device=dev), lens, output_size=S)
    start = torch.cumsum(lens, 0) - lens
    pos = torch.arange(S, device=dev) - start[req]
    blk = meta.block_table[req, pos // meta.block_size].long()
    return blk, pos % meta.block_size


def packed_metadata(meta: AttentionMetadata) -> AttentionMetadata:
    """The same requests with K/V packed one request after another (block size 1, each
    request's block table its run of rows)."""
    dev = meta.seq_lens.device
    lens = meta.seq_lens.long()
    start = torch.cumsum(lens, 0) - lens
    width = max(meta.seq_lens_cpu, default=0)
    table = (start[:, None] + torch.arange(width, device=dev)[None, :]).to(torch.int32)
    return AttentionMetadata(meta.num_reqs, meta.query_start_loc, meta.seq_lens, table, meta.slot_mapping, 1,
                             meta.query_lens_cpu, meta.seq_lens_cpu, meta.max_query_len, meta.max_seq_len)


def whole_prompts_of_one_length(meta: AttentionMetadata) -> bool:
    n = meta.query_lens_cpu
    return bool(n) and n == meta.seq_lens_cpu and min(n) == max(n)


def sdpa_step(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata | None:
    """For a step of whole prompts of one length on CUDA, where SDPA is the default: the
    packed metadata under which the step's own K/V are every request's whole context (a
    GQA layer then attends over them without reading the cache back). Else None. Once
    per step (meta.plans)."""
    if "sdpa" not in meta.plans:
        ok = device.type == "cuda" and PACKED_CUDA_DEFAULT == "sdpa" and whole_prompts_of_one_length(meta)
        meta.plans["sdpa"] = packed_metadata(meta) if ok else None
    return meta.plans["sdpa"]


def packed_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """Whole prompts of one length n: [B, heads, n, d] causal SDPA, cuDNN first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, n = meta.num_reqs, meta.query_lens_cpu[0]

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.view(B, n, *x.shape[1:]).transpose(1, 2)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[-1])


# Which kernel runs packed attention on CUDA when SDPA can take the shapes ("sdpa" or
# "triton"); the faster on one H200 at DeepSeek-V2-Lite's shapes (benchmarks/RESULTS.md).
PACKED_CUDA_DEFAULT = "sdpa"


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float,
                     backend: str | None = None, impl: str | None = None) -> torch.Tensor:
    """q [T, Hq, d_qk], k [S, Hkv, d_qk], v [S, Hkv, d_v] -> [T, Hq, d_v]; meta from
    packed_metadata (made once per step). impl forces "sdpa" or "triton"."""
    kc, vc = k.unsqueeze(1), v.unsqueeze(1)       # [S, 1, heads, d]: blocks of one token
    if use_triton(q, backend) and not unsupported("packed_attention", _attention_problem(q, kc, vc)):
        impl = impl or (PACKED_CUDA_DEFAULT if q.is_cuda else "triton")
        if impl == "sdpa" and whole_prompts_of_one_length(meta) and q.shape[0] == sum(meta.query_lens_cpu):
            return packed_attention_sdpa(q, k, v, meta, scale)
        from engine.kernels.attention import paged_attention_triton
        return paged_attention_triton(q, kc, vc, meta, scale)
    return paged_attention_ref(q, kc, vc, meta, scale)
