"""MoE routing ops: softmax top-k, and the logical-to-physical expert map with the
per-slot load count. On the device both run in one launch (softmax_topk_physical), or
the map alone after a top-k computed elsewhere; the torch references are the plain
formulas (engine/layers/router.py, to_physical_ref)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from engine.kernels import dtype_problem, unsupported, use_triton

if TYPE_CHECKING:
    from engine.kernels.moe import Alignment

MAX_TRITON_EXPERTS = 1024


def softmax_topk_ref(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float = 1.0,
                     out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    return weights.to(out_dtype), ids


def _topk_problem(logits: torch.Tensor, top_k: int) -> str | None:
    problem = dtype_problem(logits)
    if problem is None and (logits.shape[-1] > MAX_TRITON_EXPERTS or top_k > logits.shape[-1]):
        problem = f"{logits.shape[-1]} experts with top-{top_k}"
    return problem


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float = 1.0,
                 out_dtype: torch.dtype = torch.float32, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in out_dtype, logical expert ids [T, k] int64), weights scaled by
    `scale` after the optional renormalisation."""
    if use_triton(logits, backend) and not unsupported("softmax_topk", _topk_problem(logits, top_k)):
        from engine.kernels.router import softmax_topk_triton
        return softmax_topk_triton(logits, top_k, renormalize, scale, out_dtype)
    return softmax_topk_ref(logits, top_k, renormalize, scale, out_dtype)


# A device scalar: how many leading tokens of the current forward are real. The runner
# sets it around a padded (CUDA-graph) step so padding never counts as expert load; the
# kernels read it on the device, so it works inside a captured graph.
_num_valid_tokens: torch.Tensor | None = None


@contextlib.contextmanager
def counting_tokens(num_valid: torch.Tensor | None) -> Iterator[None]:
    global _num_valid_tokens
    prev, _num_valid_tokens = _num_valid_tokens, num_valid
    try:
        yield
    finally:
        _num_valid_tokens = prev


def to_physical_ref(ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                    expert_load: torch.Tensor, num_valid_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Replicas of one expert share its (token, slot) entries round-robin by entry index."""
    replica = torch.arange(ids.numel(), device=ids.device).view_as(ids) % logcnt[ids]
    phys = log2phy[ids, replica]
    ones = torch.ones_like(phys)
    if num_valid_tokens is not None:
        token = torch.arange(ids.shape[0], device=ids.device)[:, None]
        ones = ones * (token < num_valid_tokens).to(ones.dtype)
    expert_load.index_add_(0, phys.flatten(), ones.flatten())
    return phys


def to_physical(ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, expert_load: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """Physical slots of the logical expert ids [T, k]; adds each slot's entries of the
    real tokens to expert_load."""
    if use_triton(ids, backend) and not unsupported(
            "to_physical", None if log2phy.stride(-1) == 1 else "a strided expert map"):
        from engine.kernels.router import to_physical_triton
        return to_physical_triton(ids, log2phy, logcnt, expert_load, _num_valid_tokens)
    return to_physical_ref(ids, log2phy, logcnt, expert_load, _num_valid_tokens)


def softmax_topk_physical(logits: torch.Tensor, top_k: int, renormalize: bool, log2phy: torch.Tensor,
                          logcnt: torch.Tensor, expert_load: torch.Tensor, scale: float = 1.0,
                          out_dtype: torch.dtype = torch.float32, backend: str | None = None,
                          alignment: Alignment | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Alignment | None]:
    """softmax_topk, then to_physical of its ids: (weights, logical ids, physical slots,
    the alignment if filled), in one launch on the device. alignment: empty buffers
    for the MoE's entry sort of these slots (engine/kernels/moe.py plan_alignment); the
    Triton kernel fills them in the same launch, the reference leaves them (None)."""
    if use_triton(logits, backend) and not unsupported(
            "softmax_topk_physical", _topk_problem(logits, top_k) or (
                None if log2phy.stride(-1) == 1 else "a strided expert map")):
        from engine.kernels.router import softmax_topk_triton
        w, ids, phys = softmax_topk_triton(logits, top_k, renormalize, scale, out_dtype,
                                           (log2phy, logcnt, expert_load), _num_valid_tokens, alignment)
        return w, ids, phys, alignment
    w, ids = softmax_topk_ref(logits, top_k, renormalize, scale, out_dtype)
    return w, ids, to_physical_ref(ids, log2phy, logcnt, expert_load, _num_valid_tokens), None
