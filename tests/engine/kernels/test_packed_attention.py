"""Attention over packed (decompressed MLA) K/V: Triton and SDPA against the torch
reference, and the pieces the MLA layer builds a step's split from."""

from __future__ import annotations

import pytest
import torch

from engine.ops.attention import AttentionMetadata, paged_attention_ref
from engine.ops.packed_attention import (context_slots, packed_attention, packed_attention_sdpa, packed_metadata,
                                         sdpa_step, subset_metadata)
from tests.engine.kernels.cases import TOL, attention_case, interpreted, rel_err


def packed_case(reqs: list[tuple[int, int]], hq: int, hkv: int, dk: int, dv: int, dtype, device="cpu", seed=0):
    """reqs = [(cached context, query tokens)]: q [T, hq, dk], packed k [S, hkv, dk] and
    v [S, hkv, dv] (v a strided view, as the MLA layer passes it), and the metadata."""
    g = torch.Generator().manual_seed(seed)
    q_lens, seq_lens = [n for _, n in reqs], [c + n for c, n in reqs]
    S = sum(seq_lens)
    q = torch.randn(sum(q_lens), hq, dk, generator=g).to(dtype).to(device)
    k = torch.randn(S, hkv, dk, generator=g).to(dtype).to(device)
    v = torch.randn(S, hkv, dv + 16, generator=g).to(dtype).to(device)[..., 16:]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    meta = AttentionMetadata(len(reqs), qsl, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                             torch.zeros(len(reqs), 1, dtype=torch.int32, device=device),
                             torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device), 16, q_lens, seq_lens)
    return q, k, v, packed_metadata(meta)


def dense_ref(q, k, v, reqs, scale):
    """Per request, plain causal attention in float64 (queries at the end of the span)."""
    outs, qo, ko = [], 0, 0
    for c, n in reqs:
        qi, ki, vi = q[qo:qo + n].double(), k[ko:ko + c + n].double(), v[ko:ko + c + n].double()
        rep = qi.shape[1] // ki.shape[1]
        ki, vi = ki.repeat_interleave(rep, 1), vi.repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        mask = torch.arange(c + n)[None, :] > torch.arange(c, c + n)[:, None]
        s = s.masked_fill(mask.to(s.device), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi))
        qo, ko = qo + n, ko + c + n
    return torch.cat(outs)


CASES = [
    ("ragged+context", [(0, 9), (5, 3), (0, 1), (20, 12)], 4, 4, 24, 16),
    ("gqa", [(3, 7), (0, 5)], 4, 2, 16, 16),
    ("uniform-prompts", [(0, 6)] * 3, 4, 4, 24, 16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_dense(case):
    _, reqs, hq, hkv, dk, dv = case
    q, k, v, meta = packed_case(reqs, hq, hkv, dk, dv, torch.float64)
    out = packed_attention(q, k, v, meta, 0.3, backend="torch")
    assert rel_err(out, dense_ref(q, k, v, reqs, 0.3)) < 1e-6    # the reference softmax is float32


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_packed_attention(case):
    _, reqs, hq, hkv, dk, dv = case
    q, k, v, meta = packed_case(reqs, hq, hkv, dk, dv, torch.float32)
    out = packed_attention(q, k, v, meta, 0.3, backend="triton")
    assert rel_err(out, dense_ref(q, k, v, reqs, 0.3)) < TOL[torch.float32]


@pytest.mark.parametrize("hkv", [4, 2])
def test_sdpa_on_whole_prompts(hkv):
    """The SDPA layout (batch of prompts of one length, heads first) computes the same
    attention; steps it cannot take are not offered to it."""
    reqs = [(0, 6)] * 3
    q, k, v, meta = packed_case(reqs, 4, hkv, 24, 16, torch.float32)
    assert rel_err(packed_attention_sdpa(q, k, v, meta, 0.3), dense_ref(q, k, v, reqs, 0.3)) < 1e-6
    cuda = torch.device("cuda")
    assert sdpa_step(packed_case([(0, 6), (0, 5)], 4, 4, 24, 16, torch.float32)[3], cuda) is None
    assert sdpa_step(packed_case([(2, 6), (2, 6)], 4, 4, 24, 16, torch.float32)[3], cuda) is None
    assert sdpa_step(packed_case(reqs, 4, hkv, 24, 16, torch.float32)[3], torch.device("cpu")) is None
    assert sdpa_step(meta, cuda) is not None


def test_subset_and_context_slots():
    """Sub-batches see their own rows and lengths; the context slots address exactly the
    tokens the paged reference reads."""
    reqs = [(0, 5), (3, 1), (17, 9), (40, 1)]
    q, kc, vc, meta = attention_case(reqs, 4, 1, 24, 16, 4, True, torch.float64)
    rows, sub = subset_metadata(meta, [0, 2])
    assert rows.tolist() == list(range(0, 5)) + list(range(6, 15))
    assert sub.query_lens_cpu == [5, 9] and sub.seq_lens.tolist() == [5, 26]
    ref = paged_attention_ref(q, kc, vc, meta, 0.2)
    assert torch.equal(paged_attention_ref(q[rows], kc, vc, sub, 0.2), ref[rows])
    blk, off = context_slots(meta)
    ctx = kc[blk, off]                                  # [S, 1, 24], requests one after another
    out = packed_attention(q, ctx, ctx[..., :16], packed_metadata(meta), 0.2, backend="torch")
    assert rel_err(out, ref) < 1e-6


# -- compiled, at DeepSeek-V2-Lite's expanded shapes (16 heads, q/k 192, v 128) ----------

GPU_CASES = [("dsv2-prompts", [(0, 1024)] * 4), ("dsv2-ragged+context", [(0, 300), (512, 200), (1000, 64), (0, 777)])]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_packed_attention_gpu(case, impl):
    _, reqs = case
    q, k, v, meta = packed_case(reqs, 16, 16, 192, 128, torch.bfloat16, "cuda")
    out = packed_attention(q, k, v, meta, 192 ** -0.5, impl=impl)
    assert rel_err(out, dense_ref(q, k, v, reqs, 192 ** -0.5)) < TOL[torch.bfloat16]
