"""RMSNorm, optionally fused with the residual add in front of it.

rms_norm(x, w, eps)            -> normalised x
rms_norm(x, w, eps, residual)  -> (normalised x + residual, x + residual)
Computed in float32, rounded to the activation dtype before the weight multiplies
(as the reference models do); the sum is rounded to the activation dtype too.
"""

from __future__ import annotations

import torch

from engine.kernels import dtype_problem, unsupported, use_triton

MAX_TRITON_DIM = 65536


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual.view_as(x)
        residual = x
    dtype = x.dtype
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return out if residual is None else (out, residual)


def _problem(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.shape[-1] > MAX_TRITON_DIM:
        return f"rows wider than {MAX_TRITON_DIM}"
    if weight.dtype != x.dtype:
        return "a weight dtype other than the activations'"
    return dtype_problem(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, backend) and not unsupported("rms_norm", _problem(x, weight)):
        from engine.kernels.norm import rms_norm_triton
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
