"""Triton rotary embedding of q and k in one launch, optionally with the per-head
RMSNorm that Qwen3 applies to q and k just before it.

One program per token rotates every q head and every k head of that token, reading
cos/sin for its position from a cache built once ([max positions, dim/2] float32
each). The output is [rotated first halves | rotated second halves] for both pair
layouts (neox: x[i], x[i + d/2]; interleaved: x[2i], x[2i+1]), as the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, s_t, s_h, out_ptr, w_ptr, t, H, cos, sin, eps,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  INTERLEAVED: tl.constexpr, NORM: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    m = (h < H)[:, None] & (i < HALF)[None, :]
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    base = x_ptr + t * s_t + h[:, None] * s_h
    x1 = tl.load(base + i1[None, :], mask=m, other=0.0)
    x2 = tl.load(base + i2[None, :], mask=m, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + i1, mask=i < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + i2, mask=i < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    dst = out_ptr + (t * H + h[:, None]) * (2 * HALF) + i[None, :]
    tl.store(dst, o1.to(dtype), mask=m)
    tl.store(dst + HALF, o2.to(dtype), mask=m)


@triton.jit
def _rope_kernel(pos_ptr, cos_ptr, sin_ptr, q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h, qo_ptr, ko_ptr,
                 qw_ptr, kw_ptr, HQ, HK, eps,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0)
    # The reference multiplies in the activation dtype: round cos/sin to it first.
    cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr, sq_t, sq_h, qo_ptr, qw_ptr, t, HQ, cos, sin, eps, HALF, BLOCK_HQ, BLOCK_HALF,
                  INTERLEAVED, NORM)
    _rotate_heads(k_ptr, sk_t, sk_h, ko_ptr, kw_ptr, t, HK, cos, sin, eps, HALF, BLOCK_HK, BLOCK_HALF,
                  INTERLEAVED, NORM)


def rotary_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  interleaved: bool, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    T, HQ, D = q.shape
    HK = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo = torch.empty(T, HQ, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(T, HK, D, dtype=k.dtype, device=k.device)
    if T == 0:
        return qo, ko
    norm = q_norm is not None
    half = D // 2
    _rope_kernel[(T,)](positions, cos, sin, q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), qo, ko,
                       q_norm if norm else q, k_norm if norm else k, HQ, HK, eps,
                       HALF=half, BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK),
                       BLOCK_HALF=triton.next_power_of_2(half), INTERLEAVED=interleaved, NORM=norm,
                       num_warps=4 if HQ * half >= 1024 else 1)
    return qo, ko
