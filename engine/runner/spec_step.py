"""One step with P-EAGLE speculative decoding (eager, or captured in a CUDA graph for
decode batches that verify K drafts per request; sync or async scheduling).

Per step, on the device and without reading a value back:
1. the target runs the scheduled tokens; a decoding request with drafts has the query
   [last sampled token, d_1..d_k] (the drafts sit in the state table's token_ids just
   past its known tokens, where the previous step's head wrote them), and the target
   keeps its three tapped layers' inputs (`CausalLM.aux_hidden`);
2. the rejection sampler verifies the drafts against the target's logits of the last
   k+1 tokens of each request (k = 0: plain sampling of the last token), and the
   accepted drafts + the correction/bonus token are committed to the table; computed
   counts advance by the accepted tokens only (rejected drafts' KV stays in their
   slots and is overwritten when those positions are computed again);
3. the head drafts the next K tokens of every request in one forward pass. Each request
   gets nsched + K - 1 rows, laid out [stale | valid | K-1 mask]: the stale rows stand
   for rejected drafts (a device-side count), write no KV and are ignored; putting them
   first keeps every real row at its absolute position under bottom-right-aligned
   causal attention, so the row count stays known to the host.
The head has its own KV cache, addressed by the target's block table (the scheduler
allocates K-1 look-ahead slots for the mask rows).

Async scheduling: the host sizes a step from counts that assume every draft of the step
in flight was accepted (the scheduler takes the rejected ones back when that output
arrives); positions, tokens and lengths come from the device's table, which is exact.

After a KV hand-off (decode pool of the pd topology) the request arrives with the
prompt's target KV but no head KV and no drafts: its first step computes the last
prompt position again together with the producer's first token (the scheduler sets its
computed count one short), verifying nothing; those two rows give the head the taps of
the last prompt position and of the first token, and the step drafts as any other. The
head's KV of the earlier prompt positions is not handed off: those slots hold whatever
they held, which costs acceptance on long prompts, never correctness.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from engine.ops.attention import AttentionMetadata
from engine.ops.penalties import PenaltyTables, apply_penalties, count_sampled
from engine.spec.head import PEagleHead
from engine.spec.rejection import rejection_sample


class SpecDecoder:
    def __init__(self, head: PEagleHead, num_spec: int, num_blocks: int, block_size: int, max_model_len: int,
                 device: torch.device, dtype: torch.dtype, parallel: bool = True) -> None:
        self.head, self.k, self.parallel = head, num_spec, parallel
        self.block_size, self.max_model_len = block_size, max_model_len
        cfg = head.cfg
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv = torch.zeros(len(head.layers), 2, *shape, dtype=dtype, device=device)
        for i, layer in enumerate(head.layers):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        # Mask rows reach K-1 positions past the step; rows past max_model_len are ignored.
        head.reserve_positions(max_model_len + 2 * num_spec)
        self.extra_cols = -(-2 * num_spec // block_size) + 1

    @staticmethod
    def exact_lengths(seq_lens: torch.Tensor, host_upper: np.ndarray) -> list[int]:
        """Host sequence lengths for attention metadata. The host's are upper bounds
        under async scheduling (optimistic: every draft of the step in flight accepted);
        the reference attention needs the real ones, which on the CPU the "device"
        holds in host memory (reading them is no synchronisation). CUDA's kernel reads
        seq_lens on the device; the host values there only size the grid."""
        return seq_lens.tolist() if seq_lens.device.type == "cpu" else host_upper.tolist()

    # -- 2. verify and commit ----------------------------------------------------------
    def verify(self, table, rows: torch.Tensor, nsched: torch.Tensor, ndraft: torch.Tensor, samples: torch.Tensor,
               seq_lens: torch.Tensor, query_end: torch.Tensor, hidden: torch.Tensor, model, num_logits: int,
               penalties: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (tokens [B, K+1], -1 after the last; emitted count [B], 0 for rows that do
        not sample; the target's logits of each request's last ndraft + 1 tokens, packed,
        with bias and penalties applied when `penalties`: some row uses them). Commits
        the tokens to the table (and to the penalty counts)."""
        t, K, L = table, self.k, self.max_model_len
        B = rows.shape[0]
        n_logits = ndraft.long() + 1
        cu = torch.cumsum(n_logits, 0) - n_logits
        req = torch.repeat_interleave(torch.arange(B, device=rows.device), n_logits, output_size=num_logits)
        # (A padded graph entry has no tokens; its rows point anywhere and are never used.)
        idx = (query_end[req] - n_logits[req] + (torch.arange(num_logits, device=rows.device) - cu[req])).clamp(min=0)
        logits = model.compute_logits(hidden[idx])
        computed = t.num_computed[rows].long()
        draft_pos = (computed[:, None] + 1 + torch.arange(K, device=rows.device)).clamp(max=L - 1)
        drafts = t.token_ids[rows[:, None], draft_pos].long()
        if penalties:
            self._penalize(t, rows, logits, cu, ndraft.long(), drafts)
        out = rejection_sample(logits, drafts, ndraft.long(), t.temperature[rows], t.seeds[rows],
                               seq_lens.long() - ndraft.long(), cu_num_logits=cu, top_k=t.top_k[rows],
                               top_p=t.top_p[rows], min_p=t.min_p[rows])
        emitted = torch.where(samples, out.num_sampled.long(), 0)
        pos = t.num_tokens[rows].long()[:, None] + torch.arange(K + 1, device=rows.device)
        self._write_tokens(t, rows, pos, out.token_ids, torch.arange(K + 1, device=rows.device) < emitted[:, None])
        t.num_tokens[rows] += emitted.to(t.num_tokens.dtype)
        t.num_computed[rows] += torch.where(samples, nsched - ndraft + emitted - 1, nsched).to(t.num_computed.dtype)
        if penalties:
            for j in range(K + 1):
                count_sampled(rows, out.token_ids[:, j].clamp(min=0), j < emitted, t.penalties)
        return out.token_ids, emitted, logits

    def _penalize(self, t, rows: torch.Tensor, logits: torch.Tensor, cu: torch.Tensor, ndraft: torch.Tensor,
                  drafts: torch.Tensor) -> None:
        """Bias and penalties on the verified logits, in place. Row j of a request must see
        its generated tokens plus d_1..d_j (its token is used only when those drafts were
        accepted, i.e. generated): the drafts are counted, one position at a time, in a
        copy of the batch's rows of the tables (plus the pad row, flag 0, for requests
        with fewer rows); the table itself counts the emitted tokens after verification."""
        p = t.penalties
        B = rows.shape[0]
        r = torch.cat([rows.long(), rows.new_full((1,), t.pad_row).long()])
        scratch = PenaltyTables(*(getattr(p, f.name)[r] for f in fields(PenaltyTables)))
        local = torch.arange(B, device=rows.device)
        for j in range(self.k + 1):
            at = cu + ndraft.clamp(max=j)
            sub = logits[at]
            apply_penalties(sub, torch.where(ndraft >= j, local, B), scratch)
            logits[at] = sub
            if j < self.k:
                count_sampled(local, drafts[:, j], ndraft > j, scratch)

    def _write_tokens(self, t, rows: torch.Tensor, pos: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        """token_ids[row, pos] = value where valid (and pos < max_model_len), without
        boolean indexing (a host sync on the device): the others write 0 into the pad
        row's first cell, which stays 0."""
        L = self.max_model_len
        valid = valid & (pos < L)
        flat = torch.where(valid, rows.long()[:, None] * L + pos, t.pad_row * L)
        t.token_ids.view(-1)[flat.flatten()] = torch.where(valid, values, 0).flatten().to(t.token_ids.dtype)

    # -- 3. draft ----------------------------------------------------------------------
    def propose(self, table, rows: torch.Tensor, nsched: torch.Tensor, n_rows_cpu: np.ndarray,
                ndraft: torch.Tensor, samples: torch.Tensor, emitted: torch.Tensor, start: torch.Tensor,
                query_start: torch.Tensor, aux: torch.Tensor) -> None:
        """Run the head over [stale | valid | K-1 mask] rows of every request and write
        the K drafts of sampling requests past their known tokens. `start`: each
        request's first position this step (its computed count before the step);
        n_rows_cpu: its rows, nsched + K - 1 (a padded graph entry, with no tokens and the
        graph's k drafts: k + K, which write nothing). Parallel drafting: one pass over
        all rows. Chain drafting (parallel_drafting=False, EAGLE's drafter, for
        comparison): a pass over [stale | valid] gives d_1, then pass j (one row per
        request, at the j-th mask row's position) reads d_j and the head's own pre-norm
        hidden state of the row before, and gives d_{j+1}: K passes, other drafts."""
        t, K = table, self.k
        dev = rows.device
        B = rows.shape[0]
        real = nsched > 0
        n_rows = torch.where(real, nsched.long() + K - 1, ndraft.long() + K)
        stale = torch.where(samples, ndraft.long() + 1 - emitted, 0)      # rejected drafts
        lay = _Layout(rows, real, n_rows, stale, start.long() - stale, query_start.long(), aux)
        if self.parallel:
            normed, _, hq = self._pass(t, lay, torch.zeros_like(n_rows), n_rows, n_rows_cpu)
            logits = self.head.compute_logits(normed[(hq[1:, None] - K + torch.arange(K, device=dev)).flatten()])
            drafts = self.head.to_target_ids(logits.argmax(-1)).view(B, K)
        else:
            first_mask = n_rows - (K - 1)
            normed, pre, hq = self._pass(t, lay, torch.zeros_like(n_rows), first_mask, n_rows_cpu - (K - 1))
            normed, pre = normed[hq[1:] - 1], pre[hq[1:] - 1]
            picked = []
            ones, ones_cpu = torch.ones_like(n_rows), np.ones(B, dtype=np.int64)
            for k in range(K):
                picked.append(self.head.to_target_ids(self.head.compute_logits(normed).argmax(-1)))
                if k < K - 1:
                    normed, pre, _ = self._pass(t, lay, first_mask + k, ones, ones_cpu, feed=(picked[-1], pre))
            drafts = torch.stack(picked, 1)
        draft_pos = t.num_tokens[rows].long()[:, None] + torch.arange(K, device=dev)
        self._write_tokens(t, rows, draft_pos, drafts, samples[:, None].expand(B, K))

    def _pass(self, t, lay: _Layout, first: torch.Tensor, count: torch.Tensor, count_cpu: np.ndarray,
              feed: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head over rows [first, first + count) of each request's layout (the
        earlier ones are in its KV cache) -> (normed [sum(count), H], pre-norm hidden
        [sum(count), H], exclusive cumsum of count [B + 1]). feed: (token ids, hidden
        states) of every row, in place of the table's tokens and the taps (chain
        drafting)."""
        K, L, bs = self.k, self.max_model_len, self.block_size
        dev = lay.rows.device
        B = lay.rows.shape[0]
        total = int(count_cpu.sum())
        hq = torch.zeros(B + 1, dtype=torch.int64, device=dev)
        hq[1:] = torch.cumsum(count, 0)
        req = torch.repeat_interleave(torch.arange(B, device=dev), count, output_size=total)
        j = first[req] + torch.arange(total, device=dev) - hq[req]
        pos = lay.base[req] + j
        is_stale = j < lay.stale[req]
        rows = lay.rows.long()[req]
        safe = pos.clamp(0, L - 1)
        block = t.block_table[rows, safe // bs].long()
        write = ~is_stale & (pos >= 0) & (pos < L) & lay.real[req]
        slots = torch.where(write, block * bs + safe % bs, -1)
        seq_lens = (lay.base + first + count).to(torch.int32)
        # Mask rows may reach past max_model_len: extra (zero) block columns keep the
        # gathers in range; those rows' outputs are never used.
        block_table = torch.cat([t.block_table[lay.rows], t.block_table.new_zeros(B, self.extra_cols)], dim=1)
        meta = AttentionMetadata(num_reqs=B, query_start_loc=hq.to(torch.int32), seq_lens=seq_lens,
                                 block_table=block_table, slot_mapping=slots, block_size=bs,
                                 query_lens_cpu=count_cpu.tolist(),
                                 seq_lens_cpu=self.exact_lengths(seq_lens, np.full(B, L + 2 * K)))
        if feed is not None:
            normed, pre = self.head(feed[0], None, pos.clamp(min=0), torch.zeros_like(write), meta, hidden=feed[1])
            return normed, pre, hq
        is_mask = j >= (lay.n_rows - (K - 1))[req]
        # Row at position i: token x_{i+1} (committed above) and the target's taps at i.
        qs = lay.query_start
        tgt = (qs[req] + j - lay.stale[req]).clamp(min=qs[req], max=qs[req + 1] - 1).clamp(min=0)
        ids = t.token_ids[rows, (pos + 1).clamp(0, L - 1)].long()
        normed, pre = self.head(ids, lay.aux[tgt], pos.clamp(min=0), is_mask, meta)
        return normed, pre, hq


@dataclass
class _Layout:
    """One step's head rows per request: [stale | valid | K-1 mask], n_rows in all, the
    first at position `base`; `real`: the entry has tokens (not graph padding)."""
    rows: torch.Tensor
    real: torch.Tensor
    n_rows: torch.Tensor
    stale: torch.Tensor
    base: torch.Tensor
    query_start: torch.Tensor
    aux: torch.Tensor
