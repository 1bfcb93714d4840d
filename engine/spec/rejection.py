"""Verification of draft tokens: the rejection sampler (torch reference + dispatcher;
the Triton kernel is engine/spec/rejection_kernel.py).

Request i proposed num_draft[i] <= K drafts d_1..d_n and the target scored the n + 1
tokens [x, d_1..d_n], giving n + 1 rows of target_logits (packed: request i's rows
start at cu_num_logits[i], default the exclusive cumsum of num_draft + 1). Row j holds
the target's distribution p_j for the token at sequence index positions[i] + j.

- greedy rows (temperature 0): emit argmax p_j; continue while it equals d_{j+1}.
- random rows: accept d_{j+1} with probability min(1, p(d)/q(d)); on rejection emit a
  sample of the residual max(0, p - q) normalised and stop; if every draft was
  accepted, emit a bonus sample of p_n. Without draft_probs the drafts were greedy
  (q is one-hot at d): accept with probability p(d), residual = p without d.
The output tokens are then distributed exactly as sampling the target one token at a
time. p includes the request's temperature and top-k / top-p / min-p filters.

Randomness is the engine sampler's (engine/ops/sampling.py): Gumbel noise is a pure
function of (seed, sequence index, token id), and the acceptance uniform of row j is
the same hash at the token id 0xFFFFFFFF, which no vocabulary reaches. Nothing depends
on batch composition, and nothing is read back to the host: the accepted counts stay
on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import use_triton
from engine.ops.sampling import apply_filters, mix32, uniform_noise

ACCEPT_SALT_TOKEN = 0xFFFFFFFF
_MASK32 = 0xFFFFFFFF


@dataclass
class RejectionOutput:
    token_ids: torch.Tensor     # [B, K + 1] int64: the emitted tokens, -1 after the last
    num_sampled: torch.Tensor   # [B] int32: accepted drafts + 1 (the correction or bonus token)

    @property
    def num_accepted(self) -> torch.Tensor:
        return self.num_sampled - 1


def accept_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] uniforms in (0, 1) for the acceptance test: uniform_noise's hash at a token
    id beyond every vocabulary, so it is independent of the Gumbel noise of any token."""
    h = mix32(positions.long() ^ mix32(torch.tensor(ACCEPT_SALT_TOKEN, dtype=torch.int64, device=seeds.device)))
    h = mix32(((seeds.long() >> 32) & _MASK32) ^ h)
    h = mix32((seeds.long() & _MASK32) ^ h)
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def logit_starts(num_draft: torch.Tensor, cu_num_logits: torch.Tensor | None) -> torch.Tensor:
    if cu_num_logits is not None:
        return cu_num_logits[:num_draft.shape[0]].long()
    n = num_draft.long() + 1
    return torch.cumsum(n, 0) - n


def _filters_given(top_k, top_p, min_p) -> bool:
    return top_k is not None or top_p is not None or min_p is not None


def _full_filters(b: int, device, top_k, top_p, min_p):
    zeros = torch.zeros(b, device=device)
    return (top_k if top_k is not None else zeros.int(), top_p if top_p is not None else zeros + 1,
            min_p if min_p is not None else zeros)


def rejection_sample_ref(target_logits: torch.Tensor, draft_ids: torch.Tensor, num_draft: torch.Tensor,
                         temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                         draft_probs: torch.Tensor | None = None, cu_num_logits: torch.Tensor | None = None,
                         top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                         min_p: torch.Tensor | None = None) -> RejectionOutput:
    B, K = draft_ids.shape
    T, V = target_logits.shape
    dev = target_logits.device
    starts = logit_starts(num_draft, cu_num_logits)
    n = num_draft.long()
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    filters = _full_filters(B, dev, top_k, top_p, min_p) if _filters_given(top_k, top_p, min_p) else None
    out = torch.full((B, K + 1), -1, dtype=torch.int64, device=dev)
    num_sampled = torch.zeros(B, dtype=torch.int32, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    for j in range(K + 1):
        logits = target_logits[(starts + j).clamp(max=T - 1)].float()
        is_draft = j < n
        d = draft_ids[:, min(j, K - 1)].long() if K else torch.zeros(B, dtype=torch.int64, device=dev)
        x = logits / temp[:, None]
        if filters is not None:
            x = apply_filters(x, *filters)
        p = torch.softmax(x, dim=-1)
        pos = positions.long() + j
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, pos, V)))
        if draft_probs is not None and K:
            q = draft_probs[:, min(j, K - 1)].float()
        else:
            q = torch.nn.functional.one_hot(d, V).float()
        p_d, q_d = p.gather(1, d[:, None])[:, 0], q.gather(1, d[:, None])[:, 0]
        accepted_random = p_d >= accept_uniform(seeds, pos) * q_d
        residual = (p - q).clamp(min=0)
        key_r = torch.where(residual > 0, torch.log(residual) + gumbel, float("-inf"))
        from_p = (x + gumbel).argmax(-1)
        recovered = torch.where(key_r.max(-1).values > float("-inf"), key_r.argmax(-1), from_p)
        top = logits.argmax(-1)
        accepted = is_draft & torch.where(greedy, d == top, accepted_random)
        token = torch.where(accepted, d, torch.where(greedy, top, torch.where(is_draft, recovered, from_p)))
        emit = alive & (j <= n)
        out[:, j] = torch.where(emit, token, -1)
        num_sampled += emit.int()
        alive = emit & accepted
    return RejectionOutput(out, num_sampled)


def rejection_sample(target_logits: torch.Tensor, draft_ids: torch.Tensor, num_draft: torch.Tensor,
                     temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                     draft_probs: torch.Tensor | None = None, cu_num_logits: torch.Tensor | None = None,
                     top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                     min_p: torch.Tensor | None = None, backend: str | None = None,
                     row_filters: tuple[torch.Tensor, ...] | None = None) -> RejectionOutput:
    """target_logits [sum(num_draft + 1), V]; draft_ids [B, K] (target vocabulary, padded
    past num_draft); num_draft [B] int (device); temperature [B] float (0 = greedy);
    seeds [B] int64; positions [B]: sequence index of the first emitted token;
    draft_probs [B, K, V] q over the target vocabulary, or None for greedy drafts;
    top_k / top_p / min_p [B] as in the engine sampler, or None. row_filters: the same
    (temperature, top_k, top_p, min_p) per logits row, when the caller has them at hand
    (the kernel path then gathers nothing)."""
    B, K = draft_ids.shape
    if num_draft.shape != (B,) or temperature.shape != (B,) or seeds.shape != (B,) or positions.shape != (B,):
        raise ValueError("num_draft, temperature, seeds and positions must each have one entry per request")
    if draft_probs is not None and draft_probs.shape != (B, K, target_logits.shape[-1]):
        raise ValueError(f"draft_probs must be [B, K, V] = {(B, K, target_logits.shape[-1])}, "
                         f"got {tuple(draft_probs.shape)}")
    if use_triton(target_logits, backend):
        from engine.spec.rejection_kernel import rejection_sample_triton
        thr = None
        if _filters_given(top_k, top_p, min_p):
            thr = _row_thresholds(target_logits, num_draft, temperature, cu_num_logits,
                                  *_full_filters(B, target_logits.device, top_k, top_p, min_p), row_filters)
        tokens, num_sampled = rejection_sample_triton(
            target_logits, draft_ids, num_draft, temperature, seeds, positions, draft_probs,
            logit_starts(num_draft, cu_num_logits), thr)
        return RejectionOutput(tokens, num_sampled)
    return rejection_sample_ref(target_logits, draft_ids, num_draft, temperature, seeds, positions,
                                draft_probs, cu_num_logits, top_k, top_p, min_p)


def _row_thresholds(logits, num_draft, temperature, cu_num_logits, top_k, top_p, min_p,
                    row_filters=None) -> torch.Tensor:
    """Per-row filter thresholds from the engine sampler's kernel (rows past a request's
    last get its last request's settings; they are never read)."""
    from engine.kernels.sampling import filter_thresholds
    if row_filters is None:
        T = logits.shape[0]
        starts = logit_starts(num_draft, cu_num_logits)
        req = (torch.searchsorted(starts, torch.arange(T, device=logits.device), right=True) - 1).clamp(min=0)
        row_filters = (temperature[req].float(), top_k[req], top_p[req], min_p[req])
    return filter_thresholds(logits.float().contiguous(), *row_filters)
