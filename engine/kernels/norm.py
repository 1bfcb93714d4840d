"""Triton RMSNorm, optionally fused with the residual add before it.

One program per row. With a residual, the program adds it to x in the activation
dtype (rounded as the torch reference rounds), stores the sum as the new residual and
normalises that sum: one launch instead of the reference's ~8 (add, cast, pow, mean,
add, rsqrt, mul, cast, mul). Rows may be strided over two leading dims (per-head norms
on views of a fused qkv output)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, sx_a, sx_b, nb, res_ptr, sr, out_ptr, res_out_ptr, w_ptr, D, eps,
                     BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a = row // nb
    b = row % nb
    d = tl.arange(0, BLOCK_D)
    m = d < D
    x = tl.load(x_ptr + a * sx_a + b * sx_b + d, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * sr + d, mask=m, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * D + d, s, mask=m)
        x = s
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
    w = tl.load(w_ptr + d, mask=m, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * D + d, y.to(out_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """View x as [A, B, D] rows with the last dim contiguous: (x3, stride_a, stride_b, B)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x, x.stride(0), 0, 1
    if x.dim() == 3:
        return x, x.stride(0), x.stride(1), x.shape[1]
    x = x.reshape(-1, x.shape[-1])
    return x, x.stride(0), 0, 1


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = out.numel() // D if D else 0
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if n_rows:
        xv, sa, sb, nb = _rows(x)
        if residual is not None:
            residual = residual.reshape(n_rows, D)
            if residual.stride(-1) != 1:
                residual = residual.contiguous()
        res, sr = (residual, residual.stride(0)) if residual is not None else (xv, 0)
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(n_rows,)](xv, sa, sb, nb, res, sr, out, res_out, weight, D, eps,
                                    BLOCK_D=block, HAS_RES=residual is not None,
                                    num_warps=8 if block >= 4096 else 4 if block >= 1024 else 1)
    return out if residual is None else (out, res_out)
