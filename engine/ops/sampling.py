"""Gumbel-max sampling with top-k / top-p / min-p, and top-n logprobs.

The noise for (seed, position, token) is a pure integer hash of the three, so a
seeded request draws the same tokens whatever else is in the batch, and a kernel can
regenerate the noise in place instead of materialising random tensors. argmax over
logits/T + Gumbel noise is an exact sample from softmax(logits/T).
"""

from __future__ import annotations

import torch

from engine.kernels import use_triton

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B   # < 2**27, so products of 32-bit values stay inside int64


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * _MUL) & _MASK32
    x = (((x >> 16) ^ x) * _MUL) & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a function of (seed, position, token id) only."""
    tokens = mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64))
    h = mix32(positions.long()[:, None] ^ tokens[None, :])
    h = mix32(((seeds.long()[:, None] >> 32) & _MASK32) ^ h)
    h = mix32((seeds.long()[:, None] & _MASK32) ^ h)
    # 23 bits: (2**23 - 0.5) / 2**23 is exact in float32, so u < 1 always. (With 24 bits
    # the top value rounded to 1.0, whose infinite noise beat every filter and logit.)
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def apply_filters(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, then outside the top-p nucleus of what is
    left, then below min_p x the top probability. Ties at a threshold are kept."""
    vocab = logits.shape[-1]
    neg_inf = torch.tensor(float("-inf"), device=logits.device, dtype=logits.dtype)
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = torch.where(ranks < k[:, None], sorted_logits, neg_inf)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs          # mass strictly ahead of each token
    # top_p >= 1 filters nothing (float32 cumsums reach 1.0 before the tail ends).
    keep = ((before < top_p[:, None]) | (top_p[:, None] >= 1)) & (ranks < k[:, None])
    n_keep = keep.sum(dim=-1).clamp(min=1)
    threshold = sorted_logits.gather(1, (n_keep - 1)[:, None])
    # min_p: p >= min_p * p_max  <=>  logit >= logit_max + log(min_p)
    min_p_threshold = sorted_logits[:, :1] + torch.log(min_p.clamp(min=1e-38))[:, None]
    threshold = torch.maximum(threshold, torch.where(min_p[:, None] > 0, min_p_threshold, neg_inf))
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64. temperature 0 means greedy."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = apply_filters(logits / temp[:, None], top_k, top_p, min_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
           backend: str | None = None) -> torch.Tensor:
    if use_triton(logits, backend):
        from engine.kernels.sampling import sample_triton
        return sample_triton(logits.float(), temperature, top_k, top_p, min_p, seeds, positions)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seeds, positions)


def topn_logprobs(logits: torch.Tensor, sampled: torch.Tensor, n: int, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of the raw model distribution: (sampled [B], top ids [B, n], top lps [B, n])."""
    if use_triton(logits, backend):
        # Online log-sum-exp in one pass; only the n + 1 wanted entries are normalised.
        from engine.kernels.sampling import logsumexp_triton
        logits = logits.float()
        lse = logsumexp_triton(logits)[:, None]
        top, top_ids = logits.topk(n, dim=-1)
        return (logits.gather(1, sampled[:, None]) - lse).squeeze(1), top_ids, top - lse
    lp = logits.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    top_lps, top_ids = lp.topk(n, dim=-1)
    return lp.gather(1, sampled[:, None]).squeeze(1), top_ids, top_lps
