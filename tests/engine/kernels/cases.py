"""Shared pieces of the kernel tests: where they run, tolerances, and builders for
paged-attention scenarios laid out like the engine's cache."""

from __future__ import annotations

import os

import pytest
import torch

from engine.ops.attention import AttentionMetadata

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels through the Triton interpreter (TRITON_INTERPRET=1)")

# ||out - ref|| / ||ref|| against a float64 reference (METHOD.md's bands).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (unwritten or poisoned elements?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def attention_case(reqs: list[tuple[int, int]], hq: int, hkv: int, dk: int, dv: int, block_size: int,
                   mla: bool, dtype: torch.dtype, device: str = "cpu", layers: int = 2, seed: int = 0):
    """reqs = [(cached context tokens, query tokens)]. The cache is the engine's
    [blocks, layers, entries, block_size, heads, dim] tensor; the views are one layer's
    K and V (for MLA, V is the first dv dims of the single entry). Blocks are shuffled
    and the block table has spare columns, as in the runner."""
    g = torch.Generator().manual_seed(seed)
    per_req = max(-(-(c + n) // block_size) for c, n in reqs)
    num_blocks = len(reqs) * per_req + 3
    entries = 1 if mla else 2
    cache = torch.randn(num_blocks, layers, entries, block_size, hkv, dk, generator=g).to(dtype).to(device)
    k = cache[:, layers - 1, 0]
    v = k[..., :dv] if mla else cache[:, layers - 1, 1][..., :dv]
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(reqs), per_req + 2, dtype=torch.int32)
    for i in range(len(reqs)):
        table[i, :per_req] = perm[i * per_req:(i + 1) * per_req]
    q_lens, seq_lens = [n for _, n in reqs], [c + n for c, n in reqs]
    q = torch.randn(sum(q_lens), hq, dk, generator=g).to(dtype).to(device)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    meta = AttentionMetadata(len(reqs), qsl, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                             table.to(device), torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device),
                             block_size, q_lens, seq_lens)
    return q, k, v, meta
