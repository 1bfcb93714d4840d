"""Logit bias and presence / frequency / repetition penalties, applied in place to the
logits a step samples from.

Per-request state lives on the device at fixed addresses (CUDA graphs replay over it):
each state-table row has dense token counts of its generated tokens and a prompt mask
over the vocabulary, and up to MAX_LOGIT_BIAS_ENTRIES (token, bias) pairs. Dense counts
make a step's update O(batch) (one increment per sampled token) and its application one
pass over the logits the sampler reads anyway; a sparse list would need a scan of the
request's history per step. Memory: 5 bytes x vocabulary per row (e.g. 257 rows of a
152k vocabulary: 195 MB). Rows whose request uses none of this have flag 0 and cost
one flag read; a batch without such rows skips both launches (see the runner).

Order as vLLM's: logit bias, then repetition (prompt and generated tokens: a seen
token's logit / r if positive, * r otherwise), then frequency and presence (generated
tokens only: logit -= f * count + p * (count > 0)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import use_triton
from engine.sampling_params import MAX_LOGIT_BIAS_ENTRIES


@dataclass
class PenaltyTables:
    flags: torch.Tensor        # [R] int32: 1 where the row's request uses bias or penalties
    counts: torch.Tensor       # [R, V] int32: generated-token counts
    in_prompt: torch.Tensor    # [R, V] bool: tokens of the prompt
    presence: torch.Tensor     # [R] float32
    frequency: torch.Tensor    # [R] float32
    repetition: torch.Tensor   # [R] float32
    bias_ids: torch.Tensor     # [R, MAX_LOGIT_BIAS_ENTRIES] int32 (unused entries: 0)
    bias_vals: torch.Tensor    # [R, MAX_LOGIT_BIAS_ENTRIES] float32 (unused entries: 0.0)
    num_bias: torch.Tensor     # [R] int32

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> "PenaltyTables":
        z = lambda *s, dtype=torch.int32: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(z(rows), z(rows, vocab), z(rows, vocab, dtype=torch.bool), z(rows, dtype=torch.float32),
                   z(rows, dtype=torch.float32), torch.ones(rows, dtype=torch.float32, device=device),
                   z(rows, MAX_LOGIT_BIAS_ENTRIES), z(rows, MAX_LOGIT_BIAS_ENTRIES, dtype=torch.float32), z(rows))


def apply_penalties_ref(logits: torch.Tensor, rows: torch.Tensor, p: PenaltyTables) -> None:
    """logits [B, V] float32, changed in place for rows (of the tables) with a flag."""
    r = rows.long()
    x = logits + torch.zeros_like(logits).scatter_add_(1, p.bias_ids[r].long(), p.bias_vals[r])
    counts = p.counts[r]
    seen = (counts > 0) | p.in_prompt[r]
    rep = p.repetition[r][:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - p.frequency[r][:, None] * counts.float()
    x = x - p.presence[r][:, None] * (counts > 0).float()
    logits.copy_(torch.where((p.flags[r] != 0)[:, None], x, logits))


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, p: PenaltyTables, backend: str | None = None) -> None:
    if use_triton(logits, backend):
        from engine.kernels.penalties import apply_penalties_triton
        apply_penalties_triton(logits, rows, p)
        return
    apply_penalties_ref(logits, rows, p)


def count_sampled_ref(rows: torch.Tensor, sampled: torch.Tensor, sample_mask: torch.Tensor, p: PenaltyTables) -> None:
    """counts[row, token] += 1 for each flagged row that kept its sample (no host sync)."""
    r = rows.long()
    add = (sample_mask.bool() & (p.flags[r] != 0)).to(p.counts.dtype)
    p.counts.view(-1).index_put_((r * p.counts.shape[1] + sampled.long(),), add, accumulate=True)


def count_sampled(rows: torch.Tensor, sampled: torch.Tensor, sample_mask: torch.Tensor, p: PenaltyTables,
                  backend: str | None = None) -> None:
    if use_triton(rows, backend):
        from engine.kernels.penalties import count_sampled_triton
        count_sampled_triton(rows, sampled, sample_mask, p)
        return
    count_sampled_ref(rows, sampled, sample_mask, p)
