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
   slots and is overwritten when those positions are computed again; a hybrid
   target's Mamba slots take the state after the last accepted token,
   engine/layers/mamba_spec.py);
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

from dataclasses import fields

import numpy as np
import torch

from engine.ops.attention import AttentionMetadata
from engine.ops.penalties import PenaltyTables, apply_penalties, count_sampled
from engine.runner.spec_inputs import (
    HeadRows,
    commit_verified,
    head_rows,
    verify_inputs,
    write_drafts,
)
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
               seq_lens: torch.Tensor, query_start_loc: torch.Tensor, hidden: torch.Tensor, model, num_logits: int,
               penalties: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (tokens [B, K+1], -1 after the last; emitted count [B], 0 for rows that do
        not sample; the target's logits of each request's last ndraft + 1 tokens, packed,
        with bias and penalties applied when `penalties`: some row uses them). Commits
        the tokens to the table (and to the penalty counts). seq_lens, query_start_loc:
        the target step's; samples: bool or 0/1 ints."""
        t, K = table, self.k
        v = verify_inputs(t, rows, ndraft, query_start_loc, seq_lens, num_logits, K)
        logits = model.compute_logits(hidden[v.logits_indices])
        if penalties:
            self._penalize(t, rows, logits, v.cu_num_logits, ndraft.long(), v.drafts)
        out = rejection_sample(logits, v.drafts, ndraft, v.temperature, v.seeds, v.positions,
                               cu_num_logits=v.cu_num_logits, top_k=v.top_k, top_p=v.top_p, min_p=v.min_p,
                               row_filters=v.row_filters)
        emitted = commit_verified(t, rows, nsched, ndraft, samples, out.token_ids, out.num_sampled)
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

    # -- 3. draft ----------------------------------------------------------------------
    def propose(self, table, rows: torch.Tensor, nsched: torch.Tensor, n_rows_cpu: np.ndarray,
                ndraft: torch.Tensor, samples: torch.Tensor, emitted: torch.Tensor, seq_lens: torch.Tensor,
                query_start_loc: torch.Tensor, aux: torch.Tensor) -> None:
        """Run the head over [stale | valid | K-1 mask] rows of every request and write
        the K drafts of sampling requests past their known tokens. seq_lens,
        query_start_loc: the target step's; n_rows_cpu: each request's rows, nsched +
        K - 1 (a padded graph entry, with no tokens and the graph's k drafts: k + K, which
        write nothing). Parallel drafting: one pass over all rows. Chain drafting
        (parallel_drafting=False, EAGLE's drafter, for comparison): a pass over
        [stale | valid] gives d_1, then pass j (one row per request, at the j-th mask
        row's position) reads d_j and the head's own pre-norm hidden state of the row
        before, and gives d_{j+1}: K passes, other drafts."""
        t, K = table, self.k
        B = rows.shape[0]

        def rows_of(step: int, num_rows: int) -> HeadRows:
            return head_rows(t, rows, nsched, ndraft, samples, emitted, seq_lens, query_start_loc, K, step,
                             num_rows, self.block_size, self.extra_cols)

        if self.parallel:
            hr = rows_of(-1, int(n_rows_cpu.sum()))
            normed, _ = self.head(hr.input_ids, aux[hr.taps], hr.positions, hr.is_mask, self._meta(hr, n_rows_cpu))
            draft_ids = self.head.compute_logits(normed[hr.sample_rows.flatten()]).argmax(-1).view(B, K)
        else:
            context = n_rows_cpu - (K - 1)
            hr = rows_of(0, int(context.sum()))
            normed, pre = self.head(hr.input_ids, aux[hr.taps], hr.positions, hr.is_mask, self._meta(hr, context))
            last = hr.sample_rows[:, K - 1]
            normed, pre = normed[last], pre[last]
            picked = []
            ones = np.ones(B, dtype=np.int64)
            for c in range(1, K + 1):
                picked.append(self.head.compute_logits(normed).argmax(-1))
                if c < K:
                    hr = rows_of(c, B)
                    feed = self.head.to_target_ids(picked[-1])
                    normed, pre = self.head(feed, None, hr.positions, torch.zeros_like(hr.is_mask),
                                            self._meta(hr, ones), hidden=pre)
            draft_ids = torch.stack(picked, 1)
        write_drafts(t, rows, draft_ids, self.head.d2t, samples)

    def _meta(self, hr: HeadRows, count_cpu: np.ndarray) -> AttentionMetadata:
        """The head's attention metadata of one pass (count_cpu: each request's rows)."""
        B = hr.seq_lens.shape[0]
        return AttentionMetadata(num_reqs=B, query_start_loc=hr.query_start_loc, seq_lens=hr.seq_lens,
                                 block_table=hr.block_table, slot_mapping=hr.slot_mapping, block_size=self.block_size,
                                 query_lens_cpu=count_cpu.tolist(),
                                 seq_lens_cpu=self.exact_lengths(hr.seq_lens,
                                                                 np.full(B, self.max_model_len + 2 * self.k)))
