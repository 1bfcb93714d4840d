"""The P-EAGLE draft head: one forward pass proposes K draft tokens per request.

Per request the caller lays out rows (reference/peagle.md §1.1):
    [context rows ... | NTP row | K-1 MTP rows]
- a context row at position i holds token x_{i+1} and the target's taps at i (it only
  fills the head's KV cache);
- the NTP row at position n-1 holds the bonus token x_n and the taps at n-1;
- MTP row k sits at position n-1+k; its token and taps are ignored (may be garbage):
  the head puts the mask token's embedding and the shared hidden state fc(mask_hidden)
  there itself, so the caller never writes them.
The last K rows of each request give draft tokens d_1..d_K. `aux_hidden` is the
concatenation of the three tapped target layers' inputs (pre-norm residual stream),
[T, 3 * target_hidden_size].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.norm import RMSNorm
from engine.layers.params import Linear, param
from engine.ops.sampling import sample
from engine.spec.config import PEagleConfig
from engine.spec.draft_layers import FirstDraftLayer, Meta, later_draft_layer

# Drafts draw their noise from a seed derived from the request's, so it is independent
# of the noise the rejection sampler uses at the same positions (exactness needs that).
DRAFT_SEED_SALT = 0x5DEECE66D


@dataclass
class Proposal:
    draft_ids: torch.Tensor            # [num_reqs, K] int64, target vocabulary
    draft_probs: torch.Tensor | None   # [num_reqs, K, vocab] float32 q over the target vocabulary


class PEagleHead(nn.Module):
    def __init__(self, cfg: PEagleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = param(cfg.vocab_size, h)
        self.fc = Linear(3 * cfg.target_hidden_size, h)
        self.layers = nn.ModuleList([FirstDraftLayer(cfg)] + [later_draft_layer(cfg) for _ in range(cfg.num_layers - 1)])
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = param(cfg.draft_vocab_size, h)
        self.mask_hidden = param(3 * cfg.target_hidden_size)
        # target id = draft id + d2t[draft id] (offsets, as checkpoints store them).
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.identity_vocab = cfg.draft_vocab_size == cfg.vocab_size

    @torch.no_grad()
    def set_d2t(self, d2t: torch.Tensor) -> None:
        """Install the draft->target offsets (checked once here, never per step)."""
        d2t = d2t.to(self.d2t.device, torch.int64).reshape(-1)
        if d2t.shape != self.d2t.shape:
            raise ValueError(f"d2t has {d2t.numel()} entries, the head's draft vocabulary {self.d2t.numel()}")
        target = torch.arange(d2t.numel(), device=d2t.device) + d2t
        if bool(((target < 0) | (target >= self.cfg.vocab_size)).any()):
            raise ValueError("d2t maps draft ids outside the target vocabulary; the head does not fit this target")
        self.d2t.copy_(d2t)
        self.identity_vocab = self.cfg.draft_vocab_size == self.cfg.vocab_size and not bool(d2t.any())

    @property
    def mask_token_id(self) -> int:
        return self.cfg.mask_token_id

    def reserve_positions(self, num_positions: int) -> None:
        from engine.layers.rotary import RotaryEmbedding
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.reserve(num_positions)

    def shared_hidden(self) -> torch.Tensor:
        """h_shared = fc(mask_hidden): the fused hidden state of every MTP row, [H]."""
        return self.fc(self.mask_hidden[None])[0]

    def forward(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor | None, positions: torch.Tensor,
                is_mask: torch.Tensor, meta: Meta, hidden: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normed hidden [T, H] for logits, pre-norm hidden [T, H]). `hidden` [T, H]:
        each row's fused hidden state given directly, in place of fc(aux_hidden) and the
        mask rows' shared state (a chain drafter feeds back the head's own pre-norm
        output, as EAGLE-3 does)."""
        ids = torch.where(is_mask, self.cfg.mask_token_id, input_ids)
        embeds = self.embed_tokens[ids]
        if hidden is None:
            fused = self.fc(aux_hidden.to(self.fc.weight.dtype))
            # torch.where, not indexing: no host sync, and garbage in masked rows never leaks.
            hidden = torch.where(is_mask[:, None], self.shared_hidden()[None], fused)
        h, residual = self.layers[0](embeds, hidden, positions, meta)
        for layer in self.layers[1:]:
            h, residual = layer(h, residual, positions, meta)
        return self.norm(h, residual)

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary, float32."""
        return nn.functional.linear(normed, self.lm_head).float()

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def draft_probs_to_target(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., draft_V] -> [..., V]: the draft vocabulary's mass at its target ids, 0 elsewhere."""
        if self.identity_vocab:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.cfg.vocab_size)
        ids = self.to_target_ids(torch.arange(self.cfg.draft_vocab_size, device=probs.device))
        return out.index_copy_(-1, ids, probs)

    @staticmethod
    def layout(query_start_loc: torch.Tensor, num_tokens: int, num_spec: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_mask [T] bool: the last K-1 rows of each request; sample rows [B, K]: its
        last K rows), computed on the device from query_start_loc alone."""
        ends = query_start_loc[1:].long()
        rows = torch.arange(num_tokens, device=query_start_loc.device)
        req = torch.searchsorted(ends, rows, right=True).clamp(max=ends.shape[0] - 1)
        is_mask = rows >= ends[req] - (num_spec - 1)
        sample_rows = ends[:, None] - num_spec + torch.arange(num_spec, device=ends.device)
        return is_mask, sample_rows

    def propose(self, aux_hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                query_start_loc: torch.Tensor, meta: Meta, num_spec: int,
                temperature: torch.Tensor | None = None, seeds: torch.Tensor | None = None) -> Proposal:
        """One forward pass -> K drafts per request. Without temperature: greedy drafts,
        no probabilities. With temperature [B] (0 = greedy row) and seeds [B]: drafts
        sampled from q = softmax(logits / T), and q over the target vocabulary for the
        rejection sampler. Nothing here reads a device value on the host."""
        if num_spec < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_spec}")
        is_mask, sample_rows = self.layout(query_start_loc, input_ids.shape[0], num_spec)
        normed, _ = self.forward(input_ids, aux_hidden, positions, is_mask, meta)
        num_reqs = sample_rows.shape[0]
        logits = self.compute_logits(normed[sample_rows.flatten()])        # [B*K, draft_V]
        if temperature is None:
            return Proposal(self.to_target_ids(logits.argmax(-1)).view(num_reqs, num_spec), None)
        temp = temperature.float().repeat_interleave(num_spec)
        seed = (seeds.long() ^ DRAFT_SEED_SALT).repeat_interleave(num_spec)
        # The drafted token's index in the sequence: row position + 2 (see module doc).
        pos = positions[sample_rows.flatten()].long() + 2
        zeros = torch.zeros_like(temp)
        ids = sample(logits, temp, zeros.int(), torch.ones_like(temp), zeros, seed, pos)
        safe_t = torch.where(temp > 0, temp, torch.ones_like(temp))
        q = torch.softmax(logits / safe_t[:, None], dim=-1)
        q = torch.where(temp[:, None] > 0, q, nn.functional.one_hot(ids, logits.shape[-1]).float())
        q = self.draft_probs_to_target(q).view(num_reqs, num_spec, -1)
        return Proposal(self.to_target_ids(ids).view(num_reqs, num_spec), q)
