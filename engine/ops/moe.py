"""Mixture-of-experts compute: route tokens to experts, the expert MLP, weighted combine.

Expert MLPs: "silu" (SwiGLU; w13 holds gate rows then up rows, [E, 2I, H]) or "relu2"
(squared ReLU, not gated, as NemotronH; w13 holds the up rows only, [E, I, H])."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import KERNEL_DTYPES, unsupported, use_triton

ACTIVATIONS = ("silu", "relu2")


def _moe_problem(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    if not (x.dtype == w13.dtype == w2.dtype) or x.dtype not in KERNEL_DTYPES:
        return f"dtypes x {x.dtype}, experts {w13.dtype}/{w2.dtype}"
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        return "expert weights whose rows are not contiguous"
    return None


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I];
    topk_ids/topk_weights [T, k] over the E physical experts (-1: no expert) -> [T, H].
    Experts are visited in ascending id and accumulated in that order."""
    out = torch.zeros_like(x)
    for e, token_idx, h in _expert_outputs(x, w13, w2, topk_ids, topk_weights, activation):
        out.index_add_(0, token_idx, h)
    return out


def moe_entries_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Each (token, choice) entry's weighted expert output, uncombined: [T * k, H] in
    entry order (zero for id -1). Expert parallelism sums them on the token's rank."""
    out = x.new_zeros(topk_ids.numel(), x.shape[1])
    k = topk_ids.shape[1]
    for e, token_idx, h in _expert_outputs(x, w13, w2, topk_ids, topk_weights, activation):
        slot = torch.where(topk_ids[token_idx] == e)[1]
        out[token_idx * k + slot] = h
    return out


def _expert_outputs(x, w13, w2, topk_ids, topk_weights, activation):
    """(expert, token indices, weighted outputs) per expert used, in ascending id."""
    inter = w2.shape[-1]
    for e in torch.unique(topk_ids.flatten()).tolist():
        if e < 0:
            continue
        token_idx, slot = torch.where(topk_ids == e)
        h = F.linear(x[token_idx], w13[e])
        h = F.silu(h[:, :inter]) * h[:, inter:] if activation == "silu" else F.relu(h).square()
        yield e, token_idx, F.linear(h, w2[e]) * topk_weights[token_idx, slot, None].to(x.dtype)


def plan_alignment(x: torch.Tensor, w13: torch.Tensor, top_k: int, activation: str = "silu"):
    """Empty buffers for the Triton MoE's entry sort of x's routed entries, for the
    routing kernel to fill (engine/ops/router.py softmax_topk_physical)."""
    from engine.kernels.moe import plan_alignment as plan
    return plan(x, w13, top_k, activation=activation)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, backend: str | None = None, activation: str = "silu",
              alignment=None, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """alignment: the entry sort of topk_ids, already filled by the routing launch (or None);
    shared_out: the shared experts' output, added to the result (on the device inside the
    combine's launch, the same bits as `fused_moe(...) + shared_out`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"MoE activation must be one of {ACTIVATIONS}, got {activation!r}")
    if use_triton(x, backend) and not unsupported("fused_moe", _moe_problem(x, w13, w2)):
        # Sorts entries by expert on the device and runs grouped GEMMs: no host sync
        # (the reference's torch.unique and per-expert loop read back to the host).
        from engine.kernels.moe import fused_moe_triton
        fuse = shared_out is not None and shared_out.dtype == x.dtype
        out = fused_moe_triton(x, w13, w2, topk_ids, topk_weights, activation=activation, alignment=alignment,
                               shared_out=shared_out if fuse else None)
        return out if fuse or shared_out is None else out + shared_out
    out = fused_moe_ref(x, w13, w2, topk_ids, topk_weights, activation)
    return out if shared_out is None else out + shared_out
