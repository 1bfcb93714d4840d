"""Triton y = norm(x [+ residual]) @ W^T for decode-sized batches: the RMSNorm (with
the residual add) in front of a projection, in the projection's own launch.

At a handful of rows a projection reads its weight once and does little else: a
GEMV. Each program owns BLOCK_N output columns of every row, streams its slice of W
over K, and recomputes the rows' norm itself (a second read of the few rows, from
cache), so the norm costs no launch of its own. Program 0 also stores what the layer
needs besides y: the residual sum and, when asked, the normalised rows (the MoE's
experts take them). Without NORM it is a plain GEMV (o_proj and the like).

Rounding follows the references: the residual sum and the normalised row are rounded
to the activation dtype, y accumulates in float32 and is rounded to out's dtype. One
row at a time is a multiply-and-sum per column; 2-16 rows go through tl.dot (16-row
tiles, the padding rows masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.mma import mma, upcast_dots


@triton.jit
def _load_rows(x_ptr, sx, res_ptr, sr, rows, cols, mask, HAS_RES: tl.constexpr):
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + rows[:, None] * sr + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _norm_linear_kernel(x_ptr, sx, res_ptr, sr, res_out_ptr, normed_ptr, nw_ptr, eps, w_ptr, sw, b_ptr, y_ptr, sy,
                        M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        NORM: tl.constexpr, HAS_RES: tl.constexpr, STORE_NORMED: tl.constexpr,
                        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    if NORM:
        ss = tl.zeros([BLOCK_M], tl.float32)
        for kk in range(0, K, BLOCK_K):
            cols = kk + k
            x = _load_rows(x_ptr, sx, res_ptr, sr, rows, cols, row_ok[:, None] & (cols < K)[None, :], HAS_RES)
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, K, BLOCK_K):
        cols = kk + k
        k_ok = cols < K
        xm = row_ok[:, None] & k_ok[None, :]
        x = _load_rows(x_ptr, sx, res_ptr, sr, rows, cols, xm, HAS_RES)
        if NORM:
            nw = tl.load(nw_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
            xn = ((x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * nw[None, :]).to(x.dtype)
            if pid == 0:
                dst = rows[:, None] * K + cols[None, :]
                if HAS_RES:
                    tl.store(res_out_ptr + dst, x, mask=xm)
                if STORE_NORMED:
                    tl.store(normed_ptr + dst, xn, mask=xm)
            x = xn
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * sw + cols[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), 1)[None, :]
        else:
            acc = mma(x, tl.trans(w), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * sy + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def tiles(M: int, N: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): one row streams BLOCK_N x 256 weight
    tiles with enough programs (~128+) to keep every SM reading; more rows take
    16 x 16 x 128 dots. benchmarks/decode_fusion_bench.py sweeps these on the device."""
    if M == 1:
        return 1, max(2, min(32, triton.next_power_of_2(N) // 128)), 256, 4
    return 16, 16, 128, 4


def norm_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       residual: torch.Tensor | None = None, store_normed: bool = False,
                       out_dtype: torch.dtype | None = None, config: tuple[int, int, int, int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """x [M, K] (M <= 16), weight [N, K] -> (y [M, N], x + residual or None, the
    normalised rows or None). norm_weight None: no norm (and no residual). config:
    tiles other than `tiles(M, N)` (benchmark sweeps)."""
    M, K = x.shape
    N = weight.shape[0]
    norm = norm_weight is not None
    assert M <= 16 and (norm or (residual is None and not store_normed)) and weight.stride(-1) == 1
    x = x if x.stride(-1) == 1 else x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    normed = torch.empty_like(x) if store_normed else None
    if M:
        bm, bn, bk, warps = config or tiles(M, N)
        _norm_linear_kernel[(triton.cdiv(N, bn),)](
            x, x.stride(0), residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
            res_out if res_out is not None else x, normed if normed is not None else x,
            norm_weight if norm else x, eps, weight, weight.stride(0), bias if bias is not None else x, y, y.stride(0),
            M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NORM=norm, HAS_RES=residual is not None,
            STORE_NORMED=store_normed, HAS_BIAS=bias is not None, UPCAST=upcast_dots(), num_warps=warps)
    return y, res_out, normed
