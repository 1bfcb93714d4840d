"""Triton kernels that build a step's inputs from the request state table and write
the sampled tokens back into it: one program per scheduled request, no host reads.

The prepare kernel has one extra program that pads the token arrays past the
scheduled tokens (input id 0, position 0, slot -1: no KV written), so a CUDA graph
captured for a padded batch never writes a stale slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prepare_kernel(rows_ptr, nsched_ptr, num_reqs, num_tokens,
                    tok_ptr, tok_stride, computed_ptr, bt_ptr, bt_stride, max_blocks, block_size,
                    ids_out, pos_out, qsl_out, seq_lens_out, slot_out, logits_idx_out, bt_out, bt_out_stride,
                    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_BT: tl.constexpr):
    i = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    # This request's first token: the scheduled counts of the requests before it.
    counts = tl.load(nsched_ptr + r, mask=r < num_reqs, other=0)
    start = tl.sum(tl.where(r < i, counts, 0), 0)
    offs = tl.arange(0, BLOCK)
    if i == num_reqs:
        # Padding: tokens past the scheduled ones.
        for off in range(start, num_tokens, BLOCK):
            j = off + offs
            m = j < num_tokens
            tl.store(ids_out + j, tl.zeros([BLOCK], tl.int64), mask=m)
            tl.store(pos_out + j, tl.zeros([BLOCK], tl.int64), mask=m)
            tl.store(slot_out + j, tl.full([BLOCK], -1, tl.int64), mask=m)
        return
    n = tl.load(nsched_ptr + i)
    row = tl.load(rows_ptr + i).to(tl.int64)
    computed = tl.load(computed_ptr + row)
    if i == 0:
        tl.store(qsl_out, 0)
    tl.store(qsl_out + i + 1, start + n)
    tl.store(seq_lens_out + i, computed + n)
    tl.store(logits_idx_out + i, tl.maximum(start + n - 1, 0).to(tl.int64))
    for off in range(0, n, BLOCK):
        j = off + offs
        m = j < n
        pos = computed + j
        tok = tl.load(tok_ptr + row * tok_stride + pos, mask=m, other=0)
        blk = tl.load(bt_ptr + row * bt_stride + pos // block_size, mask=m, other=0)
        tl.store(ids_out + start + j, tok.to(tl.int64), mask=m)
        tl.store(pos_out + start + j, pos.to(tl.int64), mask=m)
        tl.store(slot_out + start + j, blk.to(tl.int64) * block_size + pos % block_size, mask=m)
    boffs = tl.arange(0, BLOCK_BT)
    for off in range(0, max_blocks, BLOCK_BT):
        b = off + boffs
        m = b < max_blocks
        tl.store(bt_out + i * bt_out_stride + b, tl.load(bt_ptr + row * bt_stride + b, mask=m), mask=m)


@triton.jit
def _commit_kernel(rows_ptr, nsched_ptr, sampled_ptr, mask_ptr, computed_ptr, ntok_ptr, tok_ptr, tok_stride,
                   max_model_len):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tl.store(computed_ptr + row, tl.load(computed_ptr + row) + tl.load(nsched_ptr + i))
    if tl.load(mask_ptr + i) != 0:
        n = tl.load(ntok_ptr + row)
        pos = tl.minimum(n, max_model_len - 1)
        tl.store(tok_ptr + row * tok_stride + pos, tl.load(sampled_ptr + i).to(tl.int32))
        tl.store(ntok_ptr + row, n + 1)


def prepare_inputs_triton(table, rows: torch.Tensor, num_scheduled: torch.Tensor, num_tokens: int,
                          block_size: int) -> dict[str, torch.Tensor]:
    num_reqs = rows.shape[0]
    dev = rows.device
    max_blocks = table.block_table.shape[1]
    i64 = dict(dtype=torch.int64, device=dev)
    out = dict(
        input_ids=torch.empty(num_tokens, **i64),
        positions=torch.empty(num_tokens, **i64),
        query_start_loc=torch.empty(num_reqs + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.empty(num_reqs, dtype=torch.int32, device=dev),
        slot_mapping=torch.empty(num_tokens, **i64),
        logits_indices=torch.empty(num_reqs, **i64),
        block_table=torch.empty(num_reqs, max_blocks, dtype=torch.int32, device=dev),
    )
    if num_reqs == 0:
        out["query_start_loc"].zero_()
        return out
    _prepare_kernel[(num_reqs + 1,)](
        rows, num_scheduled.to(torch.int32), num_reqs, num_tokens,
        table.token_ids, table.token_ids.stride(0), table.num_computed, table.block_table,
        table.block_table.stride(0), max_blocks, block_size,
        out["input_ids"], out["positions"], out["query_start_loc"], out["seq_lens"], out["slot_mapping"],
        out["logits_indices"], out["block_table"], out["block_table"].stride(0),
        BLOCK_R=max(2, triton.next_power_of_2(num_reqs)), BLOCK=256, BLOCK_BT=256, num_warps=4)
    return out


def commit_step_triton(table, rows: torch.Tensor, num_scheduled: torch.Tensor, sampled: torch.Tensor,
                       sample_mask: torch.Tensor) -> None:
    if rows.shape[0] == 0:
        return
    _commit_kernel[(rows.shape[0],)](
        rows, num_scheduled.to(torch.int32), sampled, sample_mask.to(torch.int8), table.num_computed,
        table.num_tokens, table.token_ids, table.token_ids.stride(0), table.max_model_len, num_warps=1)
