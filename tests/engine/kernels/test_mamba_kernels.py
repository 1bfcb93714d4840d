"""Mamba-2 kernels (conv1d, SSD scan, state update, gated RMSNorm) against their torch
references, and the references against the plain definitions (a full-sequence conv,
the token-by-token recurrence). States sit in slots of a [slots, layers, ...] cache,
as in the runner; requests mix fresh ones and ones continuing from their slot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.ops.mamba import (causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref,
                              gated_rms_norm, gated_rms_norm_ref, selective_state_update,
                              selective_state_update_ref, ssd_scan, ssd_scan_ref)
from tests.engine.kernels.cases import TOL, interpreted, rel_err

# (new tokens, continues from its slot): lengths below, at and above the window and a chunk.
REQS = [(1, True), (3, False), (9, True), (2, True), (12, False)]


def _batch(reqs, device):
    lens = [n for n, _ in reqs]
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    slots = torch.tensor([4, 0, 2, 5, 1][:len(reqs)], dtype=torch.int32, device=device)
    init = torch.tensor([i for _, i in reqs], dtype=torch.bool, device=device)
    return qsl, slots, init, sum(lens)


def _conv_case(dtype, device, reqs=REQS, C=40, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    qsl, slots, init, T = _batch(reqs, device)
    x = torch.randn(T, C, generator=g).to(dtype).to(device)
    w = (torch.randn(C, K, generator=g) * 0.5).to(dtype).to(device)
    b = torch.randn(C, generator=g).to(dtype).to(device)
    cache = torch.randn(6, 2, K - 1, C, generator=g).to(dtype).to(device)    # [slots, layers, K-1, C]
    return x, w, b, cache, qsl, slots, init


def _ssm_case(dtype, device, reqs=REQS, H=4, P=16, G=2, N=16, state_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qsl, slots, init, T = _batch(reqs, device)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x, dt, B, C = r(T, H, P), r(T, H, scale=0.5), r(T, G, N, scale=0.5), r(T, G, N, scale=0.5)
    A = -torch.rand(H, generator=g).add(0.5).to(device)
    D, dt_bias = r(H), r(H, scale=0.5)
    cache = (torch.randn(6, 3, H, P, N, generator=g) * 0.3).to(state_dtype).to(device)
    return x, dt, A, B, C, D, dt_bias, cache, qsl, slots, init


# -- the references against the definitions --------------------------------------------
def test_conv_ref_is_a_causal_conv_over_saved_and_new_inputs():
    x, w, b, cache, qsl, slots, init = _conv_case(torch.float64, "cpu")
    before = cache.clone()
    out = causal_conv1d_ref(x, w, b, cache[:, 1], qsl, slots, init)
    K = w.shape[1]
    for i, (s, e) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        prev = before[slots[i], 1] if init[i] else torch.zeros(K - 1, x.shape[1], dtype=x.dtype)
        seq = torch.cat([prev, x[s:e]])
        full = F.conv1d(seq.t()[None], w[:, None, :], b, groups=x.shape[1])[0].t()
        assert torch.allclose(out[s:e], F.silu(full), atol=1e-12)
        assert torch.equal(cache[slots[i], 1], seq[-(K - 1):])
    assert torch.equal(cache[:, 0], before[:, 0]), "another layer's state was touched"


def test_ssd_ref_is_the_recurrence_and_chunking_does_not_matter():
    x, dt, A, B, C, D, dt_bias, cache, qsl, slots, init = _ssm_case(torch.float64, "cpu", state_dtype=torch.float64)
    H = x.shape[1]
    st1, st2 = cache.clone(), cache.clone()
    y1 = ssd_scan_ref(x, dt, A, B, C, D, dt_bias, st1[:, 2], qsl, slots, init, chunk_size=4)
    y2 = ssd_scan_ref(x, dt, A, B, C, D, dt_bias, st2[:, 2], qsl, slots, init, chunk_size=64)
    assert torch.allclose(y1, y2, atol=1e-10) and torch.allclose(st1, st2, atol=1e-10)
    for i, (s, e) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        S = cache[slots[i], 2].clone() if init[i] else torch.zeros_like(cache[0, 2])
        for t in range(s, e):
            d = F.softplus(dt[t] + dt_bias)
            Bh = B[t].repeat_interleave(H // B.shape[1], 0)
            Ch = C[t].repeat_interleave(H // C.shape[1], 0)
            S = torch.exp(d * A)[:, None, None] * S + (d[:, None] * x[t])[..., None] * Bh[:, None, :]
            yt = (S * Ch[:, None, :]).sum(-1) + D[:, None] * x[t]
            assert torch.allclose(y1[t], yt, atol=1e-10)
        assert torch.allclose(st1[slots[i], 2], S, atol=1e-10)


def test_decode_refs_equal_one_token_prefill():
    reqs = [(1, True)] * 4
    x, w, b, cache, qsl, slots, init = _conv_case(torch.float64, "cpu", reqs)
    c2 = cache.clone()
    assert torch.allclose(causal_conv1d_update_ref(x, w, b, cache[:, 0], slots),
                          causal_conv1d_ref(x, w, b, c2[:, 0], qsl, slots, init), atol=1e-12)
    assert torch.allclose(cache, c2, atol=1e-12)
    x, dt, A, B, C, D, dt_bias, st, qsl, slots, init = _ssm_case(torch.float64, "cpu", reqs,
                                                                 state_dtype=torch.float64)
    st2 = st.clone()
    y = selective_state_update_ref(st[:, 1], x, dt, A, B, C, D, dt_bias, slots)
    y2 = ssd_scan_ref(x, dt, A, B, C, D, dt_bias, st2[:, 1], qsl, slots, init, chunk_size=8)
    assert torch.allclose(y, y2, atol=1e-10) and torch.allclose(st, st2, atol=1e-10)


def test_prefill_split_in_two_carries_conv_and_ssm_state():
    """Chunked prefill: 12 tokens in one call == 5 then 7 continuing from the slot."""
    x, w, b, cache, _, _, _ = _conv_case(torch.float64, "cpu", [(12, False)])
    one = torch.tensor([0], dtype=torch.int32)
    c1, c2 = cache.clone(), cache.clone()
    full = causal_conv1d_ref(x, w, b, c1[:, 0], torch.tensor([0, 12]), one, torch.tensor([False]))
    a = causal_conv1d_ref(x[:5], w, b, c2[:, 0], torch.tensor([0, 5]), one, torch.tensor([False]))
    bb = causal_conv1d_ref(x[5:], w, b, c2[:, 0], torch.tensor([0, 7]), one, torch.tensor([True]))
    assert torch.allclose(full, torch.cat([a, bb]), atol=1e-12) and torch.allclose(c1, c2)
    x, dt, A, B, C, D, dt_bias, st, _, _, _ = _ssm_case(torch.float64, "cpu", [(12, False)],
                                                        state_dtype=torch.float64)
    s1, s2 = st.clone(), st.clone()
    full = ssd_scan_ref(x, dt, A, B, C, D, dt_bias, s1[:, 0], torch.tensor([0, 12]), one,
                        torch.tensor([False]), 4)
    parts = [ssd_scan_ref(x[s:e], dt[s:e], A, B[s:e], C[s:e], D, dt_bias, s2[:, 0], torch.tensor([0, e - s]),
                          one, torch.tensor([s > 0]), 4) for s, e in ((0, 5), (5, 12))]
    assert torch.allclose(full, torch.cat(parts), atol=1e-10) and torch.allclose(s1, s2, atol=1e-10)


# -- the kernels against the references ----------------------------------------------
def _check_conv(dtype, device):
    x, w, b, cache, qsl, slots, init = _conv_case(dtype, device)
    c_ref = cache.float().clone()
    ref = causal_conv1d_ref(x.float(), w.float(), b.float(), c_ref[:, 1], qsl, slots, init)
    out = causal_conv1d(x, w, b, cache[:, 1], qsl, slots, init, backend="triton")
    assert rel_err(out, ref) < TOL[dtype] and rel_err(cache, c_ref) < TOL[dtype]
    for bias in (b, None):      # decode, with and without a conv bias
        xd, cd = x[:4], cache.clone()
        c_ref = cd.float().clone()
        ref = causal_conv1d_update_ref(xd.float(), w.float(), None if bias is None else bias.float(), c_ref[:, 0],
                                       slots[:4])
        out = causal_conv1d_update(xd, w, bias, cd[:, 0], slots[:4], backend="triton")
        assert rel_err(out, ref) < TOL[dtype] and rel_err(cd, c_ref) < TOL[dtype]


def _check_ssm(dtype, device, H=4, P=16, G=2, N=16):
    x, dt, A, B, C, D, dt_bias, st, qsl, slots, init = _ssm_case(dtype, device, H=H, P=P, G=G, N=N)
    f = lambda t: t.float()  # noqa: E731
    s_ref = st.clone()
    ref = ssd_scan_ref(f(x), f(dt), A, f(B), f(C), f(D), f(dt_bias), s_ref[:, 1], qsl, slots, init, 8)
    out = ssd_scan(x, dt, A, B, C, D, dt_bias, st[:, 1], qsl, slots, init, 8, backend="triton")
    assert rel_err(out, ref) < TOL[dtype] and rel_err(st, s_ref) < TOL[dtype]
    n = 4
    s_ref = st.clone()
    ref = selective_state_update_ref(s_ref[:, 2], f(x[:n]), f(dt[:n]), A, f(B[:n]), f(C[:n]), f(D), f(dt_bias),
                                     slots[:n])
    out = selective_state_update(st[:, 2], x[:n], dt[:n], A, B[:n], C[:n], D, dt_bias, slots[:n],
                                 backend="triton")
    assert rel_err(out, ref) < TOL[dtype] and rel_err(st, s_ref) < TOL[dtype]


def _check_norm(dtype, device, T=5, D=64, groups=4):
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(T, D, generator=g) * 2).to(dtype).to(device)
    z = torch.randn(T, 2 * D, generator=g).to(dtype).to(device)[:, D:]      # a column range of in_proj's output
    w = torch.randn(D, generator=g).to(dtype).to(device)
    out = gated_rms_norm(y, z, w, D // groups, 1e-5, backend="triton")
    ref = gated_rms_norm_ref(y.double(), z.double(), w.double(), D // groups, 1e-5)
    assert out.shape == y.shape and rel_err(out, ref) < TOL[dtype] * 2


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_kernels(dtype):
    _check_conv(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_and_state_update_kernels(dtype):
    _check_ssm(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_kernel(dtype):
    _check_norm(dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_kernels_gpu_small(dtype):
    _check_conv(dtype, "cuda")
    _check_ssm(dtype, "cuda")
    _check_norm(dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_kernels_gpu_nano_shapes(dtype):
    """Nemotron-3-Nano's Mamba widths: 64 heads x 64, 8 groups, state 128, conv 6144 wide, group 512."""
    reqs = [(300, False), (1, True), (77, True), (129, False)]
    g = torch.Generator().manual_seed(0)
    x, w, b, cache, qsl, slots, init = _conv_case(dtype, "cuda", reqs, C=6144)
    c_ref = cache.float().clone()
    ref = causal_conv1d_ref(x.float(), w.float(), b.float(), c_ref[:, 1], qsl, slots, init)
    out = causal_conv1d(x, w, b, cache[:, 1], qsl, slots, init)
    assert rel_err(out, ref) < TOL[dtype] and rel_err(cache, c_ref) < TOL[dtype]
    x, dt, A, B, C, D, dt_bias, st, qsl, slots, init = _ssm_case(dtype, "cuda", reqs, H=64, P=64, G=8, N=128)
    f = lambda t: t.float()  # noqa: E731
    s_ref = st.clone()
    ref = ssd_scan_ref(f(x), f(dt), A, f(B), f(C), f(D), f(dt_bias), s_ref[:, 1], qsl, slots, init, 128)
    out = ssd_scan(x, dt, A, B, C, D, dt_bias, st[:, 1], qsl, slots, init, 128)
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 2)
    assert rel_err(out, ref) < tol and rel_err(st, s_ref) < tol
    s_ref = st.clone()
    n = 4
    ref = selective_state_update_ref(s_ref[:, 2], f(x[:n]), f(dt[:n]), A, f(B[:n]), f(C[:n]), f(D), f(dt_bias),
                                     slots[:n])
    out = selective_state_update(st[:, 2], x[:n], dt[:n], A, B[:n], C[:n], D, dt_bias, slots[:n])
    assert rel_err(out, ref) < TOL[dtype] and rel_err(st, s_ref) < TOL[dtype]
    _check_norm(dtype, "cuda", T=33, D=4096, groups=8)
    del g
