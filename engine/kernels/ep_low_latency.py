"""Triton kernels of the low-latency EP dispatch (engine/layers/ep_low_latency.py).

`_dispatch_kernel`, one program per (token slot t < capacity, destination rank): writes
the token's choices that the destination serves (local slot, or -1) and their weights
into the destination's metadata rows, and the token's hidden row into its receive rows
only when at least one choice lands there. Slots t >= T get -1 everywhere, so the
receiver never reads a stale row. Peer buffers are reached through their addresses
(an int64 tensor, one per rank), so one launch covers every destination.

`_sum_pairs_kernel`: a token's k returned expert outputs summed in float32, in
ascending logical expert id (the order the single-process reference adds them).
The expert outputs themselves go back by the MoE kernel's own epilogue
(engine/kernels/moe.py, `TO_PEERS`), fused with the second GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "my_rank"])
def _dispatch_kernel(x_ptr, sx, phys_ptr, w_ptr, T, rx_ptrs, ids_ptrs, wts_ptrs, my_rank, slots_per_rank,
                     capacity, H, K: tl.constexpr, KP: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    dst = tl.program_id(1)
    j = tl.arange(0, KP)
    valid = (j < K) & (j * 0 + t < T)
    phys = tl.load(phys_ptr + t * K + j, mask=valid, other=-1)
    first = dst * slots_per_rank
    here = valid & (phys >= first) & (phys < first + slots_per_rank)
    local = tl.where(here, phys - first, -1).to(tl.int32)
    w = tl.load(w_ptr + t * K + j, mask=valid, other=0.0).to(tl.float32)
    row = (my_rank * capacity + t).to(tl.int64)
    ids_base = tl.load(ids_ptrs + dst).to(tl.pointer_type(tl.int32))
    wts_base = tl.load(wts_ptrs + dst).to(tl.pointer_type(tl.float32))
    tl.store(ids_base + row * K + j, local, mask=j < K)
    tl.store(wts_base + row * K + j, w, mask=j < K)
    if tl.sum(here.to(tl.int32), 0) > 0:
        rx = tl.load(rx_ptrs + dst).to(tl.pointer_type(x_ptr.dtype.element_ty)) + row * H
        src = x_ptr + t.to(tl.int64) * sx
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            tl.store(rx + h, tl.load(src + h, mask=h < H), mask=h < H)


@triton.jit
def _sum_pairs_kernel(pairs_ptr, order_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for i in tl.static_range(K):
        j = tl.load(order_ptr + t * K + i)
        acc += tl.load(pairs_ptr + (t * K + j) * H + h, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=m)


def dispatch_to_peers(x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, rx_ptrs: torch.Tensor,
                      ids_ptrs: torch.Tensor, wts_ptrs: torch.Tensor, my_rank: int, slots_per_rank: int,
                      capacity: int) -> None:
    T, H = x.shape
    K = phys.shape[1]
    world = rx_ptrs.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    _dispatch_kernel[(capacity, world)](
        x, x.stride(0), phys.contiguous(), weights.contiguous(), T, rx_ptrs, ids_ptrs, wts_ptrs, my_rank,
        slots_per_rank, capacity, H, K=K, KP=triton.next_power_of_2(K), BLOCK_H=min(1024, triton.next_power_of_2(H)),
        num_warps=4)


def sum_pairs_triton(pairs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """pairs [T, K, H], order [T, K] (which pair to add i-th) -> [T, H]."""
    T, K, H = pairs.shape
    out = torch.empty(T, H, dtype=pairs.dtype, device=pairs.device)
    if T:
        block_h = min(1024, triton.next_power_of_2(H))
        _sum_pairs_kernel[(T, triton.cdiv(H, block_h))](pairs, order.contiguous(), out, H, K=K, BLOCK_H=block_h,
                                                        num_warps=4)
    return out
