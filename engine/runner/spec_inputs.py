"""The bookkeeping of a speculative step (engine/runner/spec_step.py), built on the device
from the state table: torch references (the definitions) and their dispatchers; the
Triton kernels are engine/kernels/spec_inputs.py.

- verify_inputs: the verified logits' rows, the drafts to verify and each request's
  sampling settings, for the rejection sampler;
- commit_verified: the emitted tokens into the table and the counts advanced;
- head_rows: the head's rows of one pass, laid out [stale | valid | K-1 mask] per request;
- write_drafts: the head's drafts into the table, past the known tokens.
Every size is host-known (CUDA graphs); nothing is read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import use_triton
from engine.runner.state import RequestStateTable


@dataclass
class VerifyInputs:
    logits_indices: torch.Tensor   # [sum(ndraft + 1)] int64: each request's last ndraft + 1 tokens
    cu_num_logits: torch.Tensor    # [B] int64: each request's first row in those
    drafts: torch.Tensor           # [B, K] int64: the drafts the query holds (past ndraft: unused)
    positions: torch.Tensor        # [B] int64: sequence index of the first token verification emits
    temperature: torch.Tensor      # [B] the request's sampling settings
    seeds: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    row_filters: tuple[torch.Tensor, ...]   # (temperature, top_k, top_p, min_p) of every logits row


@dataclass
class HeadRows:
    positions: torch.Tensor        # [T] int64, >= 0
    slot_mapping: torch.Tensor     # [T] int64, -1: no KV written (stale rows, past max_model_len, padding)
    input_ids: torch.Tensor        # [T] int64: row at position i holds token i + 1
    taps: torch.Tensor             # [T] int64: the target's step row whose taps the row reads
    is_mask: torch.Tensor          # [T] bool: the K-1 mask rows
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor         # [B] int32
    block_table: torch.Tensor      # [B, max_blocks + extra_cols]
    sample_rows: torch.Tensor      # [B, K] int64: each request's last K rows


def verify_inputs_ref(table: RequestStateTable, rows: torch.Tensor, ndraft: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_logits: int,
                      num_spec: int) -> VerifyInputs:
    """query_start_loc, seq_lens: the target step's; num_logits = sum(ndraft + 1)."""
    t, K, L = table, num_spec, table.max_model_len
    dev = rows.device
    B = rows.shape[0]
    n_logits = ndraft.long() + 1
    cu = torch.cumsum(n_logits, 0) - n_logits
    req = torch.repeat_interleave(torch.arange(B, device=dev), n_logits, output_size=num_logits)
    query_end = query_start_loc[1:].long()
    # (A padded graph entry has no tokens; its rows point anywhere and are never used.)
    idx = (query_end[req] - n_logits[req] + (torch.arange(num_logits, device=dev) - cu[req])).clamp(min=0)
    computed = t.num_computed[rows].long()
    draft_pos = (computed[:, None] + 1 + torch.arange(K, device=dev)).clamp(max=L - 1)
    drafts = t.token_ids[rows[:, None], draft_pos].long()
    temperature, seeds, top_k, top_p, min_p = (x[rows] for x in (t.temperature, t.seeds, t.top_k, t.top_p, t.min_p))
    return VerifyInputs(idx, cu, drafts, seq_lens.long() - ndraft.long(), temperature, seeds, top_k, top_p, min_p,
                        tuple(x[req] for x in (temperature, top_k, top_p, min_p)))


def commit_verified_ref(table: RequestStateTable, rows: torch.Tensor, nsched: torch.Tensor, ndraft: torch.Tensor,
                        samples: torch.Tensor, tokens: torch.Tensor, num_sampled: torch.Tensor) -> torch.Tensor:
    """tokens [B, K+1] (the rejection sampler's); -> emitted [B] int64 (0 where the row
    does not sample). Computed counts advance by the accepted tokens only."""
    t = table
    samples = samples.bool()
    n = torch.arange(tokens.shape[1], device=rows.device)
    emitted = torch.where(samples, num_sampled.long(), 0)
    write_tokens_ref(t, rows, t.num_tokens[rows].long()[:, None] + n, tokens, n < emitted[:, None])
    t.num_tokens[rows] += emitted.to(t.num_tokens.dtype)
    t.num_computed[rows] += torch.where(samples, nsched - ndraft + emitted - 1, nsched).to(t.num_computed.dtype)
    return emitted


def write_drafts_ref(table: RequestStateTable, rows: torch.Tensor, draft_ids: torch.Tensor, d2t: torch.Tensor,
                     samples: torch.Tensor) -> None:
    """draft_ids [B, K] in the head's vocabulary (target id = id + d2t[id]), written past
    the known tokens of sampling requests."""
    t = table
    B, K = draft_ids.shape
    pos = t.num_tokens[rows].long()[:, None] + torch.arange(K, device=rows.device)
    write_tokens_ref(t, rows, pos, draft_ids + d2t[draft_ids], samples.bool()[:, None].expand(B, K))


def write_tokens_ref(t: RequestStateTable, rows: torch.Tensor, pos: torch.Tensor, values: torch.Tensor,
                     valid: torch.Tensor) -> None:
    """token_ids[row, pos] = value where valid (and pos < max_model_len), without
    boolean indexing (a host sync on the device): the others write 0 into the pad
    row's first cell, which stays 0."""
    L = t.max_model_len
    valid = valid & (pos < L)
    flat = torch.where(valid, rows.long()[:, None] * L + pos, t.pad_row * L)
    t.token_ids.view(-1)[flat.flatten()] = torch.where(valid, values, 0).flatten().to(t.token_ids.dtype)


def head_window(n_rows: torch.Tensor, num_spec: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row, row count) per request of a head pass over its n_rows rows. step -1:
    every row (parallel drafting); chain drafting: 0, the rows before the mask rows;
    c >= 1, the c-th mask row alone."""
    first_mask = n_rows - (num_spec - 1)
    if step < 0:
        return torch.zeros_like(n_rows), n_rows
    if step == 0:
        return torch.zeros_like(n_rows), first_mask
    return first_mask + step - 1, torch.ones_like(n_rows)


def head_rows_ref(table: RequestStateTable, rows: torch.Tensor, nsched: torch.Tensor, ndraft: torch.Tensor,
                  samples: torch.Tensor, emitted: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, num_spec: int, step: int, num_rows: int, block_size: int,
                  extra_cols: int) -> HeadRows:
    """The head's rows of one pass (head_window) after verification. Each request has
    nsched + K - 1 rows (a padded graph entry, with no tokens and ndraft drafts:
    ndraft + K, which write nothing), the first at its first position this step minus
    its stale rows (the rejected drafts: they write no KV and keep every real row at
    its position under bottom-right-aligned causal attention). seq_lens,
    query_start_loc: the target step's; num_rows: the pass's total, host-known."""
    t, K, L, bs = table, num_spec, table.max_model_len, block_size
    dev = rows.device
    B = rows.shape[0]
    real = nsched > 0
    n_rows = torch.where(real, nsched.long() + K - 1, ndraft.long() + K)
    stale = torch.where(samples.bool(), ndraft.long() + 1 - emitted, 0)
    base = seq_lens.long() - nsched.long() - stale
    first, count = head_window(n_rows, K, step)
    hq = torch.zeros(B + 1, dtype=torch.int64, device=dev)
    hq[1:] = torch.cumsum(count, 0)
    req = torch.repeat_interleave(torch.arange(B, device=dev), count, output_size=num_rows)
    j = first[req] + torch.arange(num_rows, device=dev) - hq[req]
    pos = base[req] + j
    row = rows.long()[req]
    safe = pos.clamp(0, L - 1)
    block = t.block_table[row, safe // bs].long()
    write = (j >= stale[req]) & (pos >= 0) & (pos < L) & real[req]
    # Mask rows may reach past max_model_len: extra (zero) block columns keep the
    # gathers in range; those rows' outputs are never used.
    block_table = torch.cat([t.block_table[rows], t.block_table.new_zeros(B, extra_cols)], dim=1)
    # Row at position i: token x_{i+1} (committed by verification) and the target's taps at i.
    qs = query_start_loc.long()
    taps = (qs[req] + j - stale[req]).clamp(min=qs[req], max=qs[req + 1] - 1).clamp(min=0)
    return HeadRows(
        positions=pos.clamp(min=0), slot_mapping=torch.where(write, block * bs + safe % bs, -1),
        input_ids=t.token_ids[row, (pos + 1).clamp(0, L - 1)].long(), taps=taps,
        is_mask=j >= (n_rows - (K - 1))[req], query_start_loc=hq.to(torch.int32),
        seq_lens=(base + first + count).to(torch.int32), block_table=block_table,
        sample_rows=hq[1:, None] - K + torch.arange(K, device=dev))


def verify_inputs(table, rows, ndraft, query_start_loc, seq_lens, num_logits: int, num_spec: int,
                  backend: str | None = None) -> VerifyInputs:
    if use_triton(rows, backend):
        from engine.kernels.spec_inputs import verify_inputs_triton
        return VerifyInputs(**verify_inputs_triton(table, rows, ndraft, query_start_loc, seq_lens, num_logits,
                                                   num_spec))
    return verify_inputs_ref(table, rows, ndraft, query_start_loc, seq_lens, num_logits, num_spec)


def commit_verified(table, rows, nsched, ndraft, samples, tokens, num_sampled, backend: str | None = None
                    ) -> torch.Tensor:
    if use_triton(rows, backend):
        from engine.kernels.spec_inputs import commit_verified_triton
        return commit_verified_triton(table, rows, nsched, ndraft, samples, tokens, num_sampled)
    return commit_verified_ref(table, rows, nsched, ndraft, samples, tokens, num_sampled)


def write_drafts(table, rows, draft_ids, d2t, samples, backend: str | None = None) -> None:
    if use_triton(rows, backend):
        from engine.kernels.spec_inputs import write_drafts_triton
        return write_drafts_triton(table, rows, draft_ids, d2t, samples)
    return write_drafts_ref(table, rows, draft_ids, d2t, samples)


def head_rows(table, rows, nsched, ndraft, samples, emitted, seq_lens, query_start_loc, num_spec: int, step: int,
              num_rows: int, block_size: int, extra_cols: int, backend: str | None = None) -> HeadRows:
    args = (table, rows, nsched, ndraft, samples, emitted, seq_lens, query_start_loc, num_spec, step, num_rows,
            block_size, extra_cols)
    if use_triton(rows, backend):
        from engine.kernels.spec_inputs import head_rows_triton
        return HeadRows(**head_rows_triton(*args))
    return head_rows_ref(*args)
