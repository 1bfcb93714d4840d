"""A projection with the RMSNorm (and residual add) in front of it, in one launch at
decode sizes: the decode fusions of the decoder layer (engine/models/base.py).

norm_linear(x, W)                                  -> (x @ W^T, None, None)
norm_linear(x, W, norm_weight=w, eps=e)            -> (norm(x) @ W^T, None, None)
norm_linear(x, W, norm_weight=w, residual=r, ...)  -> (norm(x + r) @ W^T, x + r, norm(x + r) if store_normed)
The product is computed in out_dtype (default x's) from operands cast to it, as the
models do (DeepSeek's router: float32 logits from float32 copies).

The Triton kernel takes up to MAX_FUSED_TOKENS rows; `decode_fused(x)` says whether the
decoder layer uses it for activations x. The fusions are off unless TANDEM_DECODE_FUSION=1
(or `decode_fusion(True)`): on the H200 the GEMV-shaped kernel lost to cuBLAS at the qkv,
router and o_proj shapes, and the batch-1 Qwen3-30B-A3B step took 4.60 ms with them against
3.92 ms without (benchmarks/RESULTS.md); off, the layer runs the separate norm and projection.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from engine.kernels import dtype_problem, unsupported, use_triton
from engine.ops.norm import rms_norm_ref

MAX_FUSED_TOKENS = 16
_enabled = os.environ.get("TANDEM_DECODE_FUSION", "0") == "1"


@contextlib.contextmanager
def decode_fusion(on: bool) -> Iterator[None]:
    global _enabled
    prev, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = prev


def decode_fused(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether the decode fusions run for activations x [T, hidden]: on, T at most
    MAX_FUSED_TOKENS (decode batches, inside their CUDA graphs), the Triton backend."""
    return _enabled and x.dim() == 2 and 0 < x.shape[0] <= MAX_FUSED_TOKENS and use_triton(x, backend)


Result = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def norm_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                    residual: torch.Tensor | None = None, store_normed: bool = False,
                    out_dtype: torch.dtype | None = None) -> Result:
    if norm_weight is None:
        xn = x
    elif residual is None:
        xn = rms_norm_ref(x, norm_weight, eps)
    else:
        xn, residual = rms_norm_ref(x, norm_weight, eps, residual)
    dt = out_dtype or x.dtype
    y = F.linear(xn.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return y, residual, xn if store_normed else None


def _problem(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
             residual: torch.Tensor | None) -> str | None:
    if x.dim() != 2 or x.shape[0] > MAX_FUSED_TOKENS:
        return f"activations of shape {tuple(x.shape)} (2-D, at most {MAX_FUSED_TOKENS} rows)"
    if weight.stride(-1) != 1:
        return "a weight whose rows are not contiguous"
    if any(t is not None and t.dtype != x.dtype for t in (weight, norm_weight, residual)):
        return "weights or residual of a dtype other than the activations'"
    return dtype_problem(x)


def norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
                store_normed: bool = False, out_dtype: torch.dtype | None = None,
                backend: str | None = None) -> Result:
    """(y, x + residual or None, the normalised rows if store_normed else None)."""
    args = (x, weight, bias, norm_weight, eps, residual, store_normed, out_dtype)
    if use_triton(x, backend) and not unsupported("norm_linear", _problem(x, weight, norm_weight, residual)):
        from engine.kernels.norm_linear import norm_linear_triton
        return norm_linear_triton(*args)
    return norm_linear_ref(*args)
