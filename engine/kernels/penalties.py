"""Triton kernels for engine/ops/penalties.py: bias + penalties in place (one program
per batch entry, which leaves at once when its row has no flag), and the count update
after sampling."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops.penalties import PenaltyTables


@triton.jit
def _penalty_kernel(logits_ptr, stride, rows_ptr, flags_ptr, counts_ptr, cstride, prompt_ptr, pstride,
                    pres_ptr, freq_ptr, rep_ptr, bias_ids_ptr, bias_vals_ptr, bstride, nbias_ptr, V,
                    BLOCK: tl.constexpr, NB_BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = tl.load(rows_ptr + b).to(tl.int64)
    if tl.load(flags_ptr + row) != 0:
        base = logits_ptr + b.to(tl.int64) * stride
        # Logit bias first: token ids of one request are distinct, so no two lanes collide.
        nb = tl.load(nbias_ptr + row)
        j = tl.arange(0, NB_BLOCK)
        for off in range(0, nb, NB_BLOCK):
            m = off + j < nb
            ids = tl.load(bias_ids_ptr + row * bstride + off + j, mask=m, other=0)
            v = tl.load(bias_vals_ptr + row * bstride + off + j, mask=m, other=0.0)
            x = tl.load(base + ids, mask=m, other=0.0)
            tl.store(base + ids, x + v, mask=m)
        tl.debug_barrier()      # the dense pass below reads what the bias pass wrote
        pres = tl.load(pres_ptr + row)
        freq = tl.load(freq_ptr + row)
        rep = tl.load(rep_ptr + row)
        offs = tl.arange(0, BLOCK)
        for off in range(0, V, BLOCK):
            m = off + offs < V
            x = tl.load(base + off + offs, mask=m, other=0.0)
            c = tl.load(counts_ptr + row * cstride + off + offs, mask=m, other=0)
            pm = tl.load(prompt_ptr + row * pstride + off + offs, mask=m, other=0)
            seen = (c > 0) | (pm != 0)
            x = tl.where(seen, tl.where(x > 0, tl.div_rn(x, rep), x * rep), x)
            x = x - freq * c.to(tl.float32)
            x = x - pres * (c > 0).to(tl.float32)
            tl.store(base + off + offs, x, mask=m)


@triton.jit
def _count_kernel(rows_ptr, sampled_ptr, mask_ptr, flags_ptr, counts_ptr, cstride):
    b = tl.program_id(0)
    row = tl.load(rows_ptr + b).to(tl.int64)
    if (tl.load(mask_ptr + b) != 0) & (tl.load(flags_ptr + row) != 0):
        ptr = counts_ptr + row * cstride + tl.load(sampled_ptr + b).to(tl.int64)
        tl.store(ptr, tl.load(ptr) + 1)     # rows of a batch are distinct: no other writer


def apply_penalties_triton(logits: torch.Tensor, rows: torch.Tensor, p: PenaltyTables) -> None:
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    B, V = logits.shape
    _penalty_kernel[(B,)](logits, logits.stride(0), rows, p.flags, p.counts, p.counts.stride(0),
                          p.in_prompt.view(torch.uint8), p.in_prompt.stride(0), p.presence, p.frequency,
                          p.repetition, p.bias_ids, p.bias_vals, p.bias_ids.stride(0), p.num_bias, V,
                          BLOCK=min(4096, triton.next_power_of_2(V)), NB_BLOCK=128, num_warps=8)


def count_sampled_triton(rows: torch.Tensor, sampled: torch.Tensor, sample_mask: torch.Tensor,
                         p: PenaltyTables) -> None:
    _count_kernel[(rows.shape[0],)](rows, sampled, sample_mask, p.flags, p.counts, p.counts.stride(0),
                                    num_warps=1)
