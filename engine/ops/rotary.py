"""Rotary position embedding of q and k from a cos/sin cache, optionally preceded by
per-head RMSNorm of q and k (Qwen3's qk-norm), optionally followed by the paged-cache
store of the rotated k and of v (write_kv_pair): one launch on the device. The fused
store runs the same float ops as the two launches, so the cache holds the same bits.

cos, sin: [max positions, dim/2] float32 (scaling folded in). Returns new tensors
[T, heads, dim] laid out [rotated first | rotated second] elements of each pair.
"""

from __future__ import annotations

import torch

from engine.kernels import dtype_problem, unsupported, use_triton
from engine.ops.attention import KVWrite, write_kv_pair
from engine.ops.norm import rms_norm_ref


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor, interleaved: bool, q_norm: torch.Tensor | None = None,
               k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    if q_norm is not None:
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    cos = cos_cache[positions][:, None, :]
    sin = sin_cache[positions][:, None, :]
    return (rotate_ref(q, cos.to(q.dtype), sin.to(q.dtype), interleaved),
            rotate_ref(k, cos.to(k.dtype), sin.to(k.dtype), interleaved))


def _problem(q: torch.Tensor, k: torch.Tensor, q_norm: torch.Tensor | None) -> str | None:
    if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        return "odd or unequal q/k head dims"
    if q.dtype != k.dtype or (q_norm is not None and q_norm.dtype != q.dtype):
        return "mixed dtypes"
    return dtype_problem(q)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor, interleaved: bool, q_norm: torch.Tensor | None = None,
           k_norm: torch.Tensor | None = None, eps: float = 1e-6, write: KVWrite | None = None,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k); with `write`, the rotated k and write.v also go into the
    paged cache (slot -1: not written)."""
    if use_triton(q, backend) and not unsupported("rotary", _problem(q, k, q_norm)):
        from engine.kernels.rotary import rotary_triton
        fused = write is not None and not unsupported("write_kv", write.problem(k))
        q, k = rotary_triton(positions, q, k, cos_cache, sin_cache, interleaved, q_norm, k_norm, eps,
                             write if fused else None)
        if fused or write is None:
            return q, k
    else:
        q, k = rotary_ref(positions, q, k, cos_cache, sin_cache, interleaved, q_norm, k_norm, eps)
    if write is not None:
        write_kv_pair(write.k_cache, write.v_cache, k, write.v, write.slot_mapping, write.block_size, backend)
    return q, k
