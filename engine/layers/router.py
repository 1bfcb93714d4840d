"""Top-k expert selection schemes: (weights [T, k] float32, logical expert ids [T, k])."""

from __future__ import annotations

import torch


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE and DeepSeek-V2 greedy: softmax over experts, keep the top k."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_limited_softmax_topk(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 group_limited_greedy: keep the topk_group groups with the best single
    expert, then the top k experts inside them (no renormalisation)."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    group_best = probs.view(probs.shape[0], n_group, -1).amax(dim=-1)
    masked = probs.masked_fill(~_group_mask(group_best, topk_group, probs), 0.0)
    return masked.topk(top_k, dim=-1)


def grouped_sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
                         topk_group: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 noaux_tc: sigmoid scores; the correction bias steers the choice only;
    a group scores the sum of its best two experts; top k inside the best groups;
    weights are the unbiased scores of the chosen experts."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    group_scores = choice.view(choice.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(-1)
    choice = choice.masked_fill(~_group_mask(group_scores, topk_group, choice), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def _group_mask(group_scores: torch.Tensor, topk_group: int, like: torch.Tensor) -> torch.Tensor:
    """Expand the best `topk_group` groups to a [T, E] boolean mask."""
    best = group_scores.topk(topk_group, dim=-1)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.repeat_interleave(like.shape[-1] // group_scores.shape[-1], dim=-1)
