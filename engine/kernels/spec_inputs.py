"""Triton kernels for the bookkeeping of a speculative step (engine/runner/spec_inputs.py
has the torch references, which define them): one program per request, no host reads.

Each replaces a dozen small torch ops (cumsum, repeat_interleave, gathers, index
writes), and in a CUDA graph every op is a node with its own launch latency, which
costs more than the work. A request's offset into the packed arrays (logits rows, head
rows) is the sum of the counts of the requests before it, computed in each program
from the whole batch's counts (as the plain step's prepare kernel does)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _verify_inputs_kernel(rows_ptr, ndraft_ptr, qsl_ptr, seq_lens_ptr, num_reqs, num_spec,
                          computed_ptr, tok_ptr, tok_stride, max_model_len,
                          temp_ptr, seeds_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                          idx_out, cu_out, drafts_out, pos_out, temp_out, seeds_out, top_k_out, top_p_out, min_p_out,
                          row_temp_out, row_top_k_out, row_top_p_out, row_min_p_out,
                          BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    nd_all = tl.load(ndraft_ptr + r, mask=r < num_reqs, other=0).to(tl.int64)
    cu = tl.sum(tl.where(r < i, nd_all + 1, 0), 0)
    nd = tl.load(ndraft_ptr + i).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tl.store(cu_out + i, cu)
    tl.store(pos_out + i, tl.load(seq_lens_ptr + i).to(tl.int64) - nd)
    temp, top_k = tl.load(temp_ptr + row), tl.load(top_k_ptr + row)
    top_p, min_p = tl.load(top_p_ptr + row), tl.load(min_p_ptr + row)
    tl.store(temp_out + i, temp)
    tl.store(seeds_out + i, tl.load(seeds_ptr + row))
    tl.store(top_k_out + i, top_k)
    tl.store(top_p_out + i, top_p)
    tl.store(min_p_out + i, min_p)
    # This request's last nd + 1 tokens (a padded entry has none: index 0, never used),
    # and its sampling filters on each of their logits rows.
    qend = tl.load(qsl_ptr + i + 1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for off in range(0, nd + 1, BLOCK):
        j = off + offs
        m = j < nd + 1
        tl.store(idx_out + cu + j, tl.maximum(qend - (nd + 1) + j, 0), mask=m)
        tl.store(row_temp_out + cu + j, temp, mask=m)
        tl.store(row_top_k_out + cu + j, top_k, mask=m)
        tl.store(row_top_p_out + cu + j, top_p, mask=m)
        tl.store(row_min_p_out + cu + j, min_p, mask=m)
    # The drafts sit just past the computed tokens, where the previous step wrote them.
    computed = tl.load(computed_ptr + row).to(tl.int64)
    for off in range(0, num_spec, BLOCK):
        k = off + offs
        pos = tl.minimum(computed + 1 + k, max_model_len - 1)
        d = tl.load(tok_ptr + row * tok_stride + pos, mask=k < num_spec, other=0)
        tl.store(drafts_out + i * num_spec + k, d.to(tl.int64), mask=k < num_spec)


@triton.jit
def _commit_verified_kernel(rows_ptr, nsched_ptr, ndraft_ptr, samples_ptr, tokens_ptr, tokens_stride, nsampled_ptr,
                            computed_ptr, ntok_ptr, tok_ptr, tok_stride, max_model_len, emitted_out,
                            BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    s = tl.load(samples_ptr + i) != 0
    emitted = tl.where(s, tl.load(nsampled_ptr + i).to(tl.int64), 0)
    tl.store(emitted_out + i, emitted)
    n = tl.load(ntok_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for off in range(0, emitted, BLOCK):
        j = off + offs
        m = (j < emitted) & (n + j < max_model_len)
        v = tl.load(tokens_ptr + i * tokens_stride + j, mask=m, other=0)
        tl.store(tok_ptr + row * tok_stride + n + j, v.to(tl.int32), mask=m)
    tl.store(ntok_ptr + row, (n + emitted).to(tl.int32))
    nsched = tl.load(nsched_ptr + i).to(tl.int64)
    # Computed tokens advance by the accepted ones: the rejected drafts' KV is stale.
    inc = tl.where(s, nsched - tl.load(ndraft_ptr + i).to(tl.int64) + emitted - 1, nsched)
    tl.store(computed_ptr + row, (tl.load(computed_ptr + row) + inc).to(tl.int32))


@triton.jit
def _write_drafts_kernel(rows_ptr, samples_ptr, draft_ptr, d2t_ptr, num_spec, ntok_ptr, tok_ptr, tok_stride,
                         max_model_len, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    if tl.load(samples_ptr + i) != 0:
        row = tl.load(rows_ptr + i).to(tl.int64)
        n = tl.load(ntok_ptr + row).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        for off in range(0, num_spec, BLOCK):
            k = off + offs
            m = (k < num_spec) & (n + k < max_model_len)
            d = tl.load(draft_ptr + i * num_spec + k, mask=m, other=0).to(tl.int64)
            d = d + tl.load(d2t_ptr + d, mask=m, other=0)          # draft -> target vocabulary
            tl.store(tok_ptr + row * tok_stride + n + k, d.to(tl.int32), mask=m)


@triton.jit(do_not_specialize=["step"])
def _head_rows_kernel(rows_ptr, nsched_ptr, ndraft_ptr, samples_ptr, emitted_ptr, seq_lens_ptr, qsl_ptr,
                      num_reqs, num_spec, step, tok_ptr, tok_stride, bt_ptr, bt_stride, max_blocks, max_model_len,
                      block_size, pos_out, slot_out, ids_out, taps_out, is_mask_out, hq_out, hseq_out, sample_out,
                      bt_out, bt_out_stride, bt_out_cols,
                      BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_BT: tl.constexpr):
    i = tl.program_id(0)
    # Every request's row window this pass, for the offset of this one.
    r = tl.arange(0, BLOCK_R)
    ns_all = tl.load(nsched_ptr + r, mask=r < num_reqs, other=0).to(tl.int64)
    nd_all = tl.load(ndraft_ptr + r, mask=r < num_reqs, other=0).to(tl.int64)
    n_rows_all = tl.where(ns_all > 0, ns_all + num_spec - 1, nd_all + num_spec)
    count_all = tl.where(step < 0, n_rows_all, tl.where(step == 0, n_rows_all - (num_spec - 1), 1))
    hq = tl.sum(tl.where(r < i, count_all, 0), 0)

    ns = tl.load(nsched_ptr + i).to(tl.int64)
    nd = tl.load(ndraft_ptr + i).to(tl.int64)
    real = ns > 0
    n_rows = tl.where(real, ns + num_spec - 1, nd + num_spec)
    first_mask = n_rows - (num_spec - 1)
    count = tl.where(step < 0, n_rows, tl.where(step == 0, first_mask, 1))
    first = tl.where(step <= 0, 0, first_mask + step - 1)
    stale = tl.where(tl.load(samples_ptr + i) != 0, nd + 1 - tl.load(emitted_ptr + i).to(tl.int64), 0)
    base = tl.load(seq_lens_ptr + i).to(tl.int64) - ns - stale
    row = tl.load(rows_ptr + i).to(tl.int64)
    qs0 = tl.load(qsl_ptr + i).to(tl.int64)
    qs1 = tl.load(qsl_ptr + i + 1).to(tl.int64)
    if i == 0:
        tl.store(hq_out, 0)
    tl.store(hq_out + i + 1, (hq + count).to(tl.int32))
    tl.store(hseq_out + i, (base + first + count).to(tl.int32))
    offs = tl.arange(0, BLOCK)
    for off in range(0, num_spec, BLOCK):
        k = off + offs
        tl.store(sample_out + i * num_spec + k, hq + count - num_spec + k, mask=k < num_spec)
    for off in range(0, count, BLOCK):
        jl = off + offs
        m = jl < count
        j = first + jl
        pos = base + j
        safe = tl.minimum(tl.maximum(pos, 0), max_model_len - 1)
        blk = tl.load(bt_ptr + row * bt_stride + safe // block_size, mask=m, other=0).to(tl.int64)
        write = (j >= stale) & (pos >= 0) & (pos < max_model_len) & real
        ids = tl.load(tok_ptr + row * tok_stride + tl.minimum(tl.maximum(pos + 1, 0), max_model_len - 1),
                      mask=m, other=0)
        # The target's taps of this position (clamp: min before max, as torch.clamp).
        tgt = tl.maximum(tl.minimum(tl.maximum(qs0 + j - stale, qs0), qs1 - 1), 0)
        o = hq + jl
        tl.store(pos_out + o, tl.maximum(pos, 0), mask=m)
        tl.store(slot_out + o, tl.where(write, blk * block_size + safe % block_size, -1), mask=m)
        tl.store(ids_out + o, ids.to(tl.int64), mask=m)
        tl.store(taps_out + o, tgt, mask=m)
        tl.store(is_mask_out + o, (j >= first_mask).to(tl.int8), mask=m)
    # Block table, with zero columns past the target's (mask rows may reach past max_model_len).
    boffs = tl.arange(0, BLOCK_BT)
    for off in range(0, bt_out_cols, BLOCK_BT):
        c = off + boffs
        v = tl.load(bt_ptr + row * bt_stride + c, mask=c < max_blocks, other=0)
        tl.store(bt_out + i * bt_out_stride + c, v, mask=c < bt_out_cols)


def _flags(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int8) if x.dtype == torch.bool else x


def _block_r(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def verify_inputs_triton(table, rows, ndraft, query_start_loc, seq_lens, num_logits: int, num_spec: int) -> dict:
    B, dev, t = rows.shape[0], rows.device, table
    i64 = dict(dtype=torch.int64, device=dev)
    out = dict(logits_indices=torch.empty(num_logits, **i64), cu_num_logits=torch.empty(B, **i64),
               drafts=torch.empty(B, num_spec, **i64), positions=torch.empty(B, **i64),
               temperature=torch.empty(B, dtype=t.temperature.dtype, device=dev),
               seeds=torch.empty(B, dtype=t.seeds.dtype, device=dev),
               top_k=torch.empty(B, dtype=t.top_k.dtype, device=dev),
               top_p=torch.empty(B, dtype=t.top_p.dtype, device=dev),
               min_p=torch.empty(B, dtype=t.min_p.dtype, device=dev))
    row_filters = tuple(torch.empty(num_logits, dtype=x.dtype, device=dev)
                        for x in (t.temperature, t.top_k, t.top_p, t.min_p))
    if B:
        _verify_inputs_kernel[(B,)](
            rows, ndraft, query_start_loc, seq_lens, B, num_spec, t.num_computed, t.token_ids, t.token_ids.stride(0),
            t.max_model_len, t.temperature, t.seeds, t.top_k, t.top_p, t.min_p, *out.values(), *row_filters,
            BLOCK_R=_block_r(B), BLOCK=16, num_warps=1)
    return dict(out, row_filters=row_filters)


def commit_verified_triton(table, rows, nsched, ndraft, samples, tokens, num_sampled) -> torch.Tensor:
    B, t = rows.shape[0], table
    emitted = torch.empty(B, dtype=torch.int64, device=rows.device)
    if B:
        _commit_verified_kernel[(B,)](
            rows, nsched, ndraft, _flags(samples), tokens, tokens.stride(0), num_sampled, t.num_computed,
            t.num_tokens, t.token_ids, t.token_ids.stride(0), t.max_model_len, emitted, BLOCK=16, num_warps=1)
    return emitted


def write_drafts_triton(table, rows, draft_ids, d2t, samples) -> None:
    B, t = draft_ids.shape[0], table
    if B:
        _write_drafts_kernel[(B,)](rows, _flags(samples), draft_ids.contiguous(), d2t, draft_ids.shape[1],
                                   t.num_tokens, t.token_ids, t.token_ids.stride(0), t.max_model_len,
                                   BLOCK=16, num_warps=1)


def head_rows_triton(table, rows, nsched, ndraft, samples, emitted, seq_lens, query_start_loc, num_spec: int,
                     step: int, num_rows: int, block_size: int, extra_cols: int) -> dict:
    B, dev, t = rows.shape[0], rows.device, table
    i64 = dict(dtype=torch.int64, device=dev)
    max_blocks = t.block_table.shape[1]
    out = dict(positions=torch.empty(num_rows, **i64), slot_mapping=torch.empty(num_rows, **i64),
               input_ids=torch.empty(num_rows, **i64), taps=torch.empty(num_rows, **i64),
               is_mask=torch.empty(num_rows, dtype=torch.int8, device=dev),
               query_start_loc=torch.zeros(B + 1, dtype=torch.int32, device=dev),
               seq_lens=torch.empty(B, dtype=torch.int32, device=dev), sample_rows=torch.empty(B, num_spec, **i64),
               block_table=torch.empty(B, max_blocks + extra_cols, dtype=t.block_table.dtype, device=dev))
    if B:
        bt = out["block_table"]
        _head_rows_kernel[(B,)](
            rows, nsched, ndraft, _flags(samples), emitted, seq_lens, query_start_loc, B, num_spec, step,
            t.token_ids, t.token_ids.stride(0), t.block_table, t.block_table.stride(0), max_blocks,
            t.max_model_len, block_size, out["positions"], out["slot_mapping"], out["input_ids"], out["taps"],
            out["is_mask"], out["query_start_loc"], out["seq_lens"], out["sample_rows"], bt, bt.stride(0),
            bt.shape[1], BLOCK_R=_block_r(B), BLOCK=64, BLOCK_BT=64, num_warps=1)
    out["is_mask"] = out["is_mask"].view(torch.bool)
    return out
