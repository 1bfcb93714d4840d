"""Fused RMSNorm (+ residual) and rotary (+ qk-norm) kernels against their torch
references, and the one-time fallback for inputs a kernel does not take."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.kernels import _warned
from engine.ops.attention import KVWrite, write_kv_pair
from engine.ops.norm import rms_norm, rms_norm_ref
from engine.ops.rotary import rotary, rotary_ref
from tests.engine.kernels.cases import TOL, interpreted, rel_err


def _norm_inputs(dtype, device, strided: bool):
    g = torch.Generator().manual_seed(0)
    if strided:     # per-head rows of a fused qkv output: [T, heads, D] with a row gap
        base = torch.randn(5, 3 * 4 * 32, generator=g)
        x = base[:, 4 * 32:8 * 32].view(5, 4, 32)
        w = torch.randn(32, generator=g)
    else:
        x = torch.randn(7, 96, generator=g) * 3
        w = torch.randn(96, generator=g)
    return x.to(dtype).to(device), w.to(dtype).to(device), (torch.randn(x.shape, generator=g) * 2).to(dtype).to(device)


def _check_norm(dtype, device):
    for strided in (False, True):
        x, w, r = _norm_inputs(dtype, device, strided)
        out = rms_norm(x, w, 1e-6, backend="triton")
        ref = rms_norm_ref(x.double(), w.double(), 1e-6)
        assert out.shape == x.shape and rel_err(out, ref) < TOL[dtype]
        if not strided:
            out, res = rms_norm(x, w, 1e-6, r, backend="triton")
            ref, ref_res = rms_norm_ref(x.double(), w.double(), 1e-6, r.double())
            assert rel_err(out, ref) < TOL[dtype] and rel_err(res, ref_res) < TOL[dtype]
            # The residual sum is rounded to the activation dtype, as the reference does
            # (the interpreter emulates bf16 rounding only approximately).
            if device == "cuda" or dtype == torch.float32:
                assert torch.equal(res, x + r)


def _rope_inputs(dtype, device, mla: bool):
    g = torch.Generator().manual_seed(1)
    T, D = 6, 16
    pos = torch.tensor([0, 3, 17, 100, 5, 63])
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(128).float()[:, None] * inv
    cos, sin = freqs.cos() * 1.1, freqs.sin() * 1.1
    if mla:     # q_pe: the tail of each head's row; k_pe: one shared head
        q = torch.randn(T, 4, 24 + D, generator=g)[..., 24:]
        k = torch.randn(T, 32 + D, generator=g)[:, 32:][:, None, :]
    else:       # q and k: column ranges of a fused qkv output
        qkv = torch.randn(T, (4 + 2 + 2) * D, generator=g)
        q, k = qkv[:, :4 * D].view(T, 4, D), qkv[:, 4 * D:6 * D].view(T, 2, D)
    qw, kw = torch.randn(D, generator=g), torch.randn(D, generator=g)
    dev = lambda t: t.to(device)  # noqa: E731
    return dev(pos), dev(q.to(dtype)), dev(k.to(dtype)), dev(cos), dev(sin), dev(qw.to(dtype)), dev(kw.to(dtype))


def _check_rope(dtype, device):
    # The kernel rounds like the bf16 reference (normalised head, weight product, cos
    # and sin); the interpreter's bf16 emulation truncates, which biases each of those
    # roundings the same way: a wider band there.
    tol = TOL[dtype] * (3 if device == "cpu" and dtype == torch.bfloat16 else 1)
    for interleaved, mla in ((False, False), (True, True), (True, False)):
        pos, q, k, cos, sin, qw, kw = _rope_inputs(dtype, device, mla)
        for norm in (False, True):
            nw = (qw, kw) if norm and not mla else (None, None)
            qo, ko = rotary(pos, q, k, cos, sin, interleaved, *nw, eps=1e-6, backend="triton")
            qr, kr = rotary_ref(pos, q.double(), k.double(), cos.double(), sin.double(), interleaved,
                                *(w.double() if w is not None else None for w in nw), eps=1e-6)
            assert qo.shape == q.shape and ko.shape == k.shape
            assert rel_err(qo, qr) < tol and rel_err(ko, kr) < tol


def _check_rope_write(dtype, device):
    """rotary with the cache store fused against the two launches it replaces (rotary,
    then write_kv_pair) on the same backend: the same bits in q, k and the whole cache.
    GQA with one and two KV heads, MLA's single entry [latent | k_pe] written as two
    column ranges, a float32 model over a bf16 cache, padding slots (-1)."""
    bs, T = 4, 6
    slots = torch.tensor([5, -1, 1, 13, -1, 2], device=device)     # slot 0 stays unwritten
    g = torch.Generator().manual_seed(2)
    for interleaved, mla in ((False, False), (True, True), (True, False)):
        pos, q, k, cos, sin, qw, kw = _rope_inputs(dtype, device, mla)
        for hk, cache_dtype in ((k.shape[1], dtype), (1, dtype), (k.shape[1], torch.bfloat16)):
            if mla and (hk != 1 or cache_dtype != dtype):
                continue
            kk = k[:, :hk]
            dv = 32 if mla else k.shape[-1]
            entries, width = (1, dv + k.shape[-1]) if mla else (2, k.shape[-1])
            cache = torch.randn(5, 2, entries, bs, hk, width, generator=g).to(cache_dtype).to(device)
            v = torch.randn(T, hk, dv, generator=g).to(dtype).to(device)
            nw = (qw, kw) if not mla else (None, None)
            for backend in ("triton", "torch"):
                caches = [cache.clone(), cache.clone()]
                writes = [KVWrite(c[:, 1, 0, ..., dv:], c[:, 1, 0, ..., :dv], v, slots, bs) if mla else
                          KVWrite(c[:, 1, 0], c[:, 1, 1], v, slots, bs) for c in caches]
                fused = rotary(pos, q, kk, cos, sin, interleaved, *nw, eps=1e-6, write=writes[0], backend=backend)
                qo, ko = rotary(pos, q, kk, cos, sin, interleaved, *nw, eps=1e-6, backend=backend)
                w = writes[1]
                write_kv_pair(w.k_cache, w.v_cache, ko, v, slots, bs, backend=backend)
                assert torch.equal(fused[0], qo) and torch.equal(fused[1], ko)
                assert torch.equal(caches[0], caches[1]) and not torch.equal(caches[0], cache)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_cache_write_is_exact(dtype):
    _check_rope_write(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    _check_norm(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary(dtype):
    _check_rope(dtype, "cpu")


@interpreted
def test_unsupported_dtype_falls_back_with_one_warning(caplog):
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    _warned.clear()
    with caplog.at_level(logging.WARNING, logger="engine.kernels"):
        a = rms_norm(x, w, 1e-6, backend="triton")
        b = rms_norm(x, w, 1e-6, backend="triton")
    assert torch.equal(a, rms_norm_ref(x, w, 1e-6)) and torch.equal(a, b)
    warnings = [r for r in caplog.records if "rms_norm" in r.getMessage()]
    assert len(warnings) == 1 and "float64" in warnings[0].getMessage()


@interpreted
def test_rotary_odd_head_dim_falls_back():
    pos = torch.tensor([1, 2])
    q, k = torch.randn(2, 2, 5), torch.randn(2, 1, 5)
    cos, sin = torch.randn(4, 2), torch.randn(4, 2)
    # An odd dim is not a valid rotary input either; the point is no kernel crash and
    # the reference's answer.
    with pytest.raises(RuntimeError):
        rotary_ref(pos, q, k, cos, sin, False)
    with pytest.raises(RuntimeError):
        rotary(pos, q, k, cos, sin, False, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rotary_gpu(dtype):
    _check_norm(dtype, "cuda")
    _check_rope(dtype, "cuda")
    _check_rope_write(dtype, "cuda")


@interpreted
def test_attention_and_moe_fall_back_on_unsupported_dtypes(caplog):
    from engine.ops.attention import paged_attention, paged_attention_ref
    from engine.ops.moe import fused_moe, fused_moe_ref
    from tests.engine.kernels.cases import attention_case
    q, k, v, meta = attention_case([(5, 3), (0, 4)], 4, 2, 16, 16, 4, False, torch.float64)
    _warned.clear()
    with caplog.at_level(logging.WARNING, logger="engine.kernels"):
        out = paged_attention(q, k, v, meta, 0.25, backend="triton")
        x = torch.randn(3, 8, dtype=torch.float64)
        w13, w2 = torch.randn(4, 12, 8, dtype=torch.float64), torch.randn(4, 8, 6, dtype=torch.float64)
        ids, wts = torch.tensor([[0, 2], [1, 3], [2, 0]]), torch.rand(3, 2, dtype=torch.float64)
        moe = fused_moe(x, w13, w2, ids, wts, backend="triton")
    assert torch.equal(out, paged_attention_ref(q, k, v, meta, 0.25))
    assert torch.equal(moe, fused_moe_ref(x, w13, w2, ids, wts))
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "paged_attention" in msgs and "fused_moe" in msgs and "torch reference" in msgs
