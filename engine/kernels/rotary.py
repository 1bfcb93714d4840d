"""Triton rotary embedding of q and k in one launch, optionally with the per-head
RMSNorm that Qwen3 applies to q and k just before it.

One program per token rotates every q head and every k head of that token, reading
cos/sin for its position from a cache built once ([max positions, dim/2] float32
each). The output is [rotated first halves | rotated second halves] for both pair
layouts (neox: x[i], x[i + d/2]; interleaved: x[2i], x[2i+1]), as the reference.

With WRITE, the program also stores its token's rotated k and its v into the paged
cache (what write_kv_pair would do next, one launch fewer per attention layer): the
rotated k is rounded to k's dtype, then cast to the cache's, as the two launches do."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, s_t, s_h, out_ptr, w_ptr, t, H, cos, sin, eps, c_ptr, sc_h, c_heads,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  INTERLEAVED: tl.constexpr, NORM: tl.constexpr, WRITE: tl.constexpr):
    """With WRITE, the first c_heads heads also go to c_ptr, this token's cache row
    (c_heads = 0 for a padding row)."""
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
    o1 = o1.to(dtype)
    o2 = o2.to(dtype)
    dst = out_ptr + (t * H + h[:, None]) * (2 * HALF) + i[None, :]
    tl.store(dst, o1, mask=m)
    tl.store(dst + HALF, o2, mask=m)
    if WRITE:
        c = c_ptr + h[:, None] * sc_h + i[None, :]
        mc = (h < c_heads)[:, None] & (i < HALF)[None, :]
        tl.store(c, o1.to(c_ptr.dtype.element_ty), mask=mc)
        tl.store(c + HALF, o2.to(c_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _rope_kernel(pos_ptr, cos_ptr, sin_ptr, q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h, qo_ptr, ko_ptr,
                 qw_ptr, kw_ptr, HQ, HK, eps,
                 slot_ptr, block_size, kc_ptr, skc_b, skc_s, skc_h, v_ptr, sv_t, sv_h, vc_ptr, svc_b, svc_s, svc_h, DV,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_DV: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr, WRITE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0)
    # The reference multiplies in the activation dtype: round cos/sin to it first.
    cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr, sq_t, sq_h, qo_ptr, qw_ptr, t, HQ, cos, sin, eps, qo_ptr, 0, 0, HALF, BLOCK_HQ,
                  BLOCK_HALF, INTERLEAVED, NORM, False)
    if WRITE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        heads = tl.where(slot >= 0, HK, 0)      # a padding row (-1) stores nothing
        slot = tl.maximum(slot, 0)
        blk = slot // block_size
        off = slot % block_size
        _rotate_heads(k_ptr, sk_t, sk_h, ko_ptr, kw_ptr, t, HK, cos, sin, eps, kc_ptr + blk * skc_b + off * skc_s,
                      skc_h, heads, HALF, BLOCK_HK, BLOCK_HALF, INTERLEAVED, NORM, True)
        h = tl.arange(0, BLOCK_HK)
        d = tl.arange(0, BLOCK_DV)
        m = (h < heads)[:, None] & (d < DV)[None, :]
        v = tl.load(v_ptr + t * sv_t + h[:, None] * sv_h + d[None, :], mask=m)
        tl.store(vc_ptr + blk * svc_b + off * svc_s + h[:, None] * svc_h + d[None, :],
                 v.to(vc_ptr.dtype.element_ty), mask=m)
    else:
        _rotate_heads(k_ptr, sk_t, sk_h, ko_ptr, kw_ptr, t, HK, cos, sin, eps, ko_ptr, 0, 0, HALF, BLOCK_HK,
                      BLOCK_HALF, INTERLEAVED, NORM, False)


def rotary_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  interleaved: bool, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                  eps: float = 1e-6, write=None) -> tuple[torch.Tensor, torch.Tensor]:
    """write: an engine.ops.attention.KVWrite, or None."""
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
    if write is not None:
        kc, vc, v = write.k_cache, write.v_cache, write.v
        v = v if v.stride(-1) == 1 else v.contiguous()
        assert kc.stride(-1) == 1 and vc.stride(-1) == 1 and v.shape[:2] == k.shape[:2]
        cache_args = (write.slot_mapping, write.block_size, kc, kc.stride(0), kc.stride(1), kc.stride(2),
                      v, v.stride(0), v.stride(1), vc, vc.stride(0), vc.stride(1), vc.stride(2), v.shape[-1])
    else:
        cache_args = (positions, 1, k, 0, 0, 0, k, 0, 0, k, 0, 0, 0, 1)
    _rope_kernel[(T,)](positions, cos, sin, q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), qo, ko,
                       q_norm if norm else q, k_norm if norm else k, HQ, HK, eps, *cache_args,
                       HALF=half, BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK),
                       BLOCK_HALF=triton.next_power_of_2(half), BLOCK_DV=triton.next_power_of_2(cache_args[-1]),
                       INTERLEAVED=interleaved, NORM=norm, WRITE=write is not None,
                       # Warps as without the write: the qk-norm's sums then reduce in the same order.
                       num_warps=4 if HQ * half >= 1024 else 1)
    return qo, ko
