"""Paged attention and KV writes: Triton kernels against the torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.ops.attention import paged_attention, paged_attention_ref, write_kv, write_kv_ref
from tests.engine.kernels.cases import TOL, attention_case, interpreted, rel_err

RAGGED = [(0, 5), (3, 1), (17, 9), (40, 1), (0, 1)]     # prefill, decode, chunk over context, ...
# (name, reqs, hq, hkv, dk, dv, block_size, mla)
CASES = [
    ("gqa-ragged", RAGGED, 8, 2, 32, 32, 4, False),
    ("gqa-decode", [(0, 1), (30, 1), (70, 1)], 8, 2, 32, 32, 16, False),
    ("gqa-odd-group", [(0, 20), (33, 12)], 6, 2, 48, 48, 8, False),
    ("mha-long-chunk", [(5, 40)], 4, 4, 16, 16, 4, False),
    ("mla-tiny", [(0, 5), (12, 1), (33, 7)], 4, 1, 40, 32, 4, True),
    ("mla-576", [(0, 3), (12, 1), (70, 2)], 4, 1, 576, 512, 16, True),
]


def _check(case, dtype, device="cpu", **kw):
    _, reqs, hq, hkv, dk, dv, bs, mla = case
    q, k, v, meta = attention_case(reqs, hq, hkv, dk, dv, bs, mla, dtype, device)
    scale = dk ** -0.5
    ref = paged_attention_ref(q.double(), k.double(), v.double(), meta, scale)
    if kw:
        from engine.kernels.attention import paged_attention_triton
        out = paged_attention_triton(q, k, v, meta, scale, **kw)
    else:
        out = paged_attention(q, k, v, meta, scale, backend="triton")
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < TOL[dtype], err


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_fp32(case):
    _check(case, torch.float32)


@interpreted
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=["gqa", "mla"])
def test_attention_bf16(case):
    _check(case, torch.bfloat16)


@interpreted
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_attention_split_kv(splits):
    """Forced split counts, including more splits than tiles (empty splits)."""
    _check(CASES[0], torch.float32, num_splits=splits)


@interpreted
def test_attention_ignores_host_lists_beyond_grid_sizing():
    """The kernel reads lengths on the device: stale host lists of the same maxima give
    the same result."""
    _, reqs, hq, hkv, dk, dv, bs, mla = CASES[0]
    q, k, v, meta = attention_case(reqs, hq, hkv, dk, dv, bs, mla, torch.float32)
    ref = paged_attention(q, k, v, meta, 0.3, backend="triton")
    meta.query_lens_cpu = [max(meta.query_lens_cpu)] * meta.num_reqs
    meta.seq_lens_cpu = [max(meta.seq_lens_cpu)] * meta.num_reqs
    assert torch.equal(paged_attention(q, k, v, meta, 0.3, backend="triton"), ref)


def _check_q_rope_apart(dtype, device):
    """MLA's query in two tensors (latent part, rotated rope part) gives the bits of the
    concatenated query: read in place where K's tail tile is the rope width (48 = 32 +
    16, 576 = 512 + 64; split-KV too), concatenated by the dispatcher where it is not
    (40 = 32 + 8), and by the reference on the torch backend."""
    for dk, dv, splits in ((48, 32, None), (48, 32, 3), (576, 512, None), (40, 32, None)):
        q, k, v, meta = attention_case([(0, 3), (12, 1), (33, 2)], 4, 1, dk, dv, 4, True, dtype, device)
        q_lat, q_pe = q[..., :dv].clone(), q[..., dv:].clone()
        for backend in ("triton", "torch"):
            if splits is not None and backend == "torch":
                continue
            if splits is None:
                whole = paged_attention(q, k, v, meta, 0.2, backend)
                apart = paged_attention(q_lat, k, v, meta, 0.2, backend, q_rope=q_pe)
            else:
                from engine.kernels.attention import paged_attention_triton
                whole = paged_attention_triton(q, k, v, meta, 0.2, num_splits=splits)
                apart = paged_attention_triton(q_lat, k, v, meta, 0.2, num_splits=splits, q_rope=q_pe)
            assert torch.equal(whole, apart), (dk, splits, backend)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_q_rope_apart_is_exact(dtype):
    _check_q_rope_apart(dtype, "cpu")


def _write_case(dtype, device, heads=2, dim=24, tokens=9):
    g = torch.Generator().manual_seed(1)
    cache_full = torch.randn(6, 3, 2, 4, heads, dim, generator=g).to(dtype).to(device)
    cache = cache_full[:, 1, 0]                          # a strided layer view
    qkv = torch.randn(tokens, 3 * heads * dim, generator=g).to(dtype).to(device)
    values = qkv[:, heads * dim:2 * heads * dim].view(tokens, heads, dim)   # strided rows
    slots = torch.randperm(24, generator=g)[:tokens].to(device)
    slots[[2, 5]] = -1                                   # padding: not written
    return cache_full, cache, values, slots


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(dtype):
    full_a, cache_a, values, slots = _write_case(dtype, "cpu")
    full_b = full_a.clone()
    write_kv_ref(cache_a, values, slots, 4)
    write_kv(full_b[:, 1, 0], values, slots, 4, backend="triton")
    assert torch.equal(full_a, full_b)


# -- compiled, at real shapes ---------------------------------------------------------

GPU_CASES = [
    ("qwen3-prefill+decode", [(0, 300), (512, 1), (1000, 1), (200, 700), (64, 64)], 32, 4, 128, 128, 16, False),
    ("qwen3-decode-long", [(4096, 1)] + [(1024 + 37 * i, 1) for i in range(15)], 32, 4, 128, 128, 16, False),
    ("dsv2-mla-prefill+decode", [(0, 300), (512, 1), (1000, 1), (200, 700)], 16, 1, 576, 512, 16, True),
    ("dsv2-mla-decode-long", [(4096, 1)] + [(1024 + 37 * i, 1) for i in range(15)], 16, 1, 576, 512, 16, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_attention_gpu(case):
    _check(case, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_attention_gpu_fp32():
    _check(GPU_CASES[0], torch.float32, "cuda")


@pytest.mark.gpu
def test_write_kv_gpu():
    full_a, cache_a, values, slots = _write_case(torch.bfloat16, "cuda", heads=4, dim=128, tokens=20)
    full_b = full_a.clone()
    write_kv_ref(cache_a, values, slots, 4)
    write_kv(full_b[:, 1, 0], values, slots, 4)
    assert torch.equal(full_a, full_b)


def test_tile_configs_fit_shared_memory():
    """Head dim 256 overflowed the tuned prefill tiles (262,144 bytes on a 232,448-byte
    H200); the fit shrinks them, and leaves every tuned config at head dim <= 128 alone."""
    from engine.kernels.attention import default_config, fit_shared_memory
    limit = 232448
    for max_q in (1, 1024):
        for d in (64, 128):
            assert fit_shared_memory(default_config(max_q, False), d, d, 2, limit) == default_config(max_q, False)
        assert fit_shared_memory(default_config(max_q, True), 576, 512, 2, limit) == default_config(max_q, True)
        cfg = fit_shared_memory(default_config(max_q, False), 256, 256, 2, limit)
        assert cfg.rows * 256 * 2 + cfg.num_stages * cfg.block_n * 512 * 2 <= limit
    assert fit_shared_memory(default_config(1024, False), 256, 256, 2, limit).num_stages == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_q_rope_apart_gpu(dtype):
    _check_q_rope_apart(dtype, "cuda")
