"""Triton Mamba-2 SSD: the chunked scan for prefill and the single-step state update
for decode, both reading and writing each request's SSM state in its slot.

Prefill: one program per (request, head, block of head dims) walks the request's
tokens in chunks of BLOCK_Q, keeping the [BLOCK_P, N] state in registers (float32):
  y     = exp(cs) * (C @ S^T)                      from the state at the chunk's start
        + ((C @ B^T) * exp(cs_i - cs_j) * dt_j, causal) @ x   inside the chunk
        + D * x
  S     = exp(cs_last) * S + (x * exp(cs_last - cs) * dt)^T @ B
with cs the running sum of dt * A inside the chunk. The chunk is a tile size, not the
model's chunk_size: any chunking gives the same values up to rounding. The dots take
the activation dtype (tensor cores); states and sums stay float32.

Decode: one program per (request, head, block of head dims) updates its state rows in
place and writes y = S C + D x. Neither kernel reads anything back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.mma import mma, upcast_dots


@triton.jit
def _softplus(v):
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def _ssd_kernel(x_ptr, sx_t, sx_h, dt_ptr, sdt_t, a_ptr, b_ptr, sb_t, sb_g, c_ptr, sc_t, sc_g, d_ptr, dtb_ptr,
                st_ptr, ss_s, ss_h, ss_p, y_ptr, sy_t, sy_h, qsl_ptr, slots_ptr, init_ptr, HPG, P, N,
                BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pm, nm = p < P, nn < N
    start = tl.load(qsl_ptr + r).to(tl.int64)
    n = (tl.load(qsl_ptr + r + 1) - start).to(tl.int32)
    rows = tl.where(tl.load(init_ptr + r) != 0, P, 0)      # state rows to read: all, or none (fresh)
    st = st_ptr + tl.load(slots_ptr + r).to(tl.int64) * ss_s + h * ss_h + p[:, None] * ss_p + nn[None, :]
    S = tl.load(st, mask=(p < rows)[:, None] & nm[None, :], other=0.0).to(tl.float32)
    g = h // HPG
    A = tl.load(a_ptr + h).to(tl.float32)
    Dh = tl.load(d_ptr + h).to(tl.float32)
    bias = tl.load(dtb_ptr + h).to(tl.float32)
    i = tl.arange(0, BLOCK_Q)
    causal = i[:, None] >= i[None, :]
    for c0 in range(0, n, BLOCK_Q):
        t = c0 + i
        tm = t < n
        row = start + t
        d = _softplus(tl.load(dt_ptr + row * sdt_t + h, mask=tm, other=0.0).to(tl.float32) + bias)
        d = tl.where(tm, d, 0.0)
        dA = d * A
        cs = tl.cumsum(dA, 0)
        last = tl.sum(dA, 0)
        x = tl.load(x_ptr + row[:, None] * sx_t + h * sx_h + p[None, :], mask=tm[:, None] & pm[None, :], other=0.0)
        Bm = tl.load(b_ptr + row[:, None] * sb_t + g * sb_g + nn[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
        Cm = tl.load(c_ptr + row[:, None] * sc_t + g * sc_g + nn[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
        y = mma(Cm, tl.trans(S).to(Cm.dtype), tl.zeros([BLOCK_Q, BLOCK_P], tl.float32), UPCAST)
        y = y * tl.exp(cs)[:, None]
        cb = mma(Cm, tl.trans(Bm), tl.zeros([BLOCK_Q, BLOCK_Q], tl.float32), UPCAST)
        seg = tl.where(causal, cs[:, None] - cs[None, :], float("-inf"))
        scores = cb * tl.exp(seg) * d[None, :]
        y = mma(scores.to(x.dtype), x, y, UPCAST)
        y += Dh * x.to(tl.float32)
        tl.store(y_ptr + row[:, None] * sy_t + h * sy_h + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=tm[:, None] & pm[None, :])
        xw = x.to(tl.float32) * (tl.exp(last - cs) * d)[:, None]
        S = mma(tl.trans(xw.to(Bm.dtype)), Bm, S * tl.exp(last), UPCAST)
    tl.store(st, S.to(st_ptr.dtype.element_ty), mask=pm[:, None] & nm[None, :])


@triton.jit
def _state_update_kernel(st_ptr, ss_s, ss_h, ss_p, x_ptr, sx_b, sx_h, dt_ptr, sdt_b, a_ptr, b_ptr, sb_b, sb_g,
                         c_ptr, sc_b, sc_g, d_ptr, dtb_ptr, y_ptr, sy_b, sy_h, slots_ptr, HPG, P, N,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pm, nm = p < P, nn < N
    g = h // HPG
    st = st_ptr + tl.load(slots_ptr + b).to(tl.int64) * ss_s + h * ss_h + p[:, None] * ss_p + nn[None, :]
    m2 = pm[:, None] & nm[None, :]
    S = tl.load(st, mask=m2, other=0.0).to(tl.float32)
    d = _softplus(tl.load(dt_ptr + b * sdt_b + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32))
    decay = tl.exp(d * tl.load(a_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * sx_b + h * sx_h + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(b_ptr + b * sb_b + g * sb_g + nn, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + b * sc_b + g * sc_g + nn, mask=nm, other=0.0).to(tl.float32)
    S = S * decay + (d * x)[:, None] * Bv[None, :]
    tl.store(st, S.to(st_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(S * Cv[None, :], 1) + tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * sy_b + h * sy_h + p, y.to(y_ptr.dtype.element_ty), mask=pm)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def ssd_scan_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor, dt_bias: torch.Tensor, ssm_state: torch.Tensor, query_start_loc: torch.Tensor,
                    state_slots: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    x, dt, B, C = _rows(x), _rows(dt), _rows(B), _rows(C)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_reqs = state_slots.shape[0]
    if num_reqs == 0 or T == 0:
        return y
    block_p = min(32, max(16, triton.next_power_of_2(P)))
    block_n = max(16, triton.next_power_of_2(N))
    block_q = 32 if x.element_size() > 2 else 64
    _ssd_kernel[(num_reqs, H, triton.cdiv(P, block_p))](
        x, x.stride(0), x.stride(1), dt, dt.stride(0), A, B, B.stride(0), B.stride(1), C, C.stride(0), C.stride(1),
        D, dt_bias, ssm_state, ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2),
        y, y.stride(0), y.stride(1), query_start_loc, state_slots, has_initial_state.view(torch.uint8), H // G,
        P, N,
        BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n, UPCAST=upcast_dots(), num_warps=4)
    return y


def selective_state_update_triton(ssm_state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                  B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                                  state_slots: torch.Tensor) -> torch.Tensor:
    Bsz, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    x, B, C = _rows(x), _rows(B), _rows(C)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if Bsz == 0:
        return y
    block_p = min(32, triton.next_power_of_2(P))
    block_n = triton.next_power_of_2(N)
    _state_update_kernel[(Bsz, H, triton.cdiv(P, block_p))](
        ssm_state, ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), x, x.stride(0), x.stride(1),
        dt, dt.stride(0), A, B, B.stride(0), B.stride(1), C, C.stride(0), C.stride(1), D, dt_bias,
        y, y.stride(0), y.stride(1), state_slots, H // G, P, N, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return y
