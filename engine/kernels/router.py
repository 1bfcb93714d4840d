"""Triton MoE routing: softmax top-k, and the logical-to-physical expert map with the
per-slot load count, in one launch (the torch path takes ~11 small launches per layer:
softmax, a two-kernel top-k, renormalise, cast, arange, gather, modulo, gather, ones,
index_add). At decode sizes one program routes every token and then sorts the entries
for the MoE's grouped GEMMs (its align), so routing and align are one launch too. The
map alone is a kernel of its own for routers whose top-k runs in torch (DeepSeek-V3's
grouped sigmoid)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.moe import Alignment, _align_kernel


@triton.jit
def _softmax_topk_kernel(logits_ptr, s_l, w_ptr, ids_ptr, E, scale,
                         log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr, valid_ptr,
                         TOPK: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
                         MAP: tl.constexpr, HAS_VALID: tl.constexpr):
    _route_token(tl.program_id(0).to(tl.int64), logits_ptr, s_l, w_ptr, ids_ptr, E, scale, log2phy_ptr, s_map,
                 logcnt_ptr, phys_ptr, load_ptr, valid_ptr, TOPK, K_P2, BLOCK_E, RENORM, MAP, HAS_VALID)


@triton.jit(do_not_specialize=["T", "max_blocks"])
def _route_align_kernel(logits_ptr, s_l, T, w_ptr, ids_ptr, E, scale,
                        log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr, valid_ptr,
                        num_slots, sorted_ptr, block_expert_ptr, cursor_ptr, max_blocks,
                        TOPK: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
                        HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Decode sizes, one program: every token's routing, then the MoE's align over the
    physical slots just written (the align of engine/kernels/moe.py, run in place)."""
    for t in range(T):
        _route_token(t, logits_ptr, s_l, w_ptr, ids_ptr, E, scale, log2phy_ptr, s_map, logcnt_ptr,
                     phys_ptr, load_ptr, valid_ptr, TOPK, K_P2, BLOCK_E, RENORM, True, HAS_VALID)
    tl.debug_barrier()   # the slots stored above must be visible to every thread of the align
    _align_kernel(phys_ptr, T * TOPK, num_slots, sorted_ptr, block_expert_ptr, cursor_ptr, max_blocks,
                  BLOCK_M, BINS, CHUNK, 64)


@triton.jit
def _route_token(t, logits_ptr, s_l, w_ptr, ids_ptr, E, scale, log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr,
                 valid_ptr, TOPK: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
                 MAP: tl.constexpr, HAS_VALID: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * s_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    # Padded rows of a CUDA-graph batch may hold garbage (NaN): they must still pick
    # valid expert ids, so NaN counts as -inf and an empty row gives zero weights.
    x = tl.where(x == x, x, float("-inf"))
    m = tl.max(x, 0)
    p = tl.exp(x - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(p, 0)
    p = p / tl.where(total > 0, total, 1.0)
    p = tl.where(e < E, p, -1.0)
    k = tl.arange(0, K_P2)
    w = tl.zeros([K_P2], tl.float32)
    ids = tl.zeros([K_P2], tl.int64)
    for j in tl.static_range(TOPK):
        best = tl.argmax(p, 0)          # the first of equal values: the lower expert id
        w = tl.where(k == j, tl.max(p, 0), w)
        ids = tl.where(k == j, best.to(tl.int64), ids)
        p = tl.where(e == best, -2.0, p)
    if RENORM:
        wsum = tl.sum(w, 0)
        w = w / tl.where(wsum > 0, wsum, 1.0)
    tl.store(w_ptr + t * TOPK + k, (w * scale).to(w_ptr.dtype.element_ty), mask=k < TOPK)
    tl.store(ids_ptr + t * TOPK + k, ids, mask=k < TOPK)
    if MAP:
        _map_and_count(ids, t * TOPK + k, k < TOPK, log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr, valid_ptr,
                       TOPK, HAS_VALID)


@triton.jit
def _map_and_count(ids, i, m, log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr, valid_ptr,
                   TOPK: tl.constexpr, HAS_VALID: tl.constexpr):
    """Entry i (token i // TOPK) of logical expert ids[i] -> its physical slot: replica
    i mod (the expert's copies); adds one to the slot's load."""
    replica = i % tl.load(logcnt_ptr + ids, mask=m, other=1)
    phys = tl.load(log2phy_ptr + ids * s_map + replica, mask=m, other=0)
    tl.store(phys_ptr + i, phys, mask=m)
    count = m
    if HAS_VALID:   # padded tokens of a CUDA-graph batch do not count as load
        count = m & (i // TOPK < tl.load(valid_ptr))
    tl.atomic_add(load_ptr + phys, tl.full(phys.shape, 1, load_ptr.dtype.element_ty), mask=count)


@triton.jit
def _physical_kernel(ids_ptr, N, log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr, valid_ptr,
                     TOPK: tl.constexpr, BLOCK: tl.constexpr, HAS_VALID: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    ids = tl.load(ids_ptr + i, mask=m, other=0).to(tl.int64)
    _map_and_count(ids, i, m, log2phy_ptr, s_map, logcnt_ptr, phys_ptr, load_ptr, valid_ptr, TOPK, HAS_VALID)


def softmax_topk_triton(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float,
                        out_dtype: torch.dtype, expert_map: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        num_valid_tokens: torch.Tensor | None = None, alignment: Alignment | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, logical ids); with expert_map = (log2phy, logcnt, expert_load) also the
    physical slots, the load counted, in the same launch; with an alignment (and the
    map) that launch is one program that also fills it for the MoE (decode sizes)."""
    T, E = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    w = torch.empty(T, top_k, dtype=out_dtype, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if expert_map is not None:
        log2phy, logcnt, load = expert_map
        phys = torch.empty(T, top_k, dtype=log2phy.dtype, device=logits.device)
        s_map = log2phy.stride(0)
    else:
        log2phy = logcnt = phys = load = ids      # unused
        s_map = 0
    valid = num_valid_tokens if num_valid_tokens is not None else ids
    common = dict(TOPK=top_k, K_P2=max(2, triton.next_power_of_2(top_k)), BLOCK_E=triton.next_power_of_2(E),
                  RENORM=renormalize, HAS_VALID=num_valid_tokens is not None)
    if T and alignment is not None:
        a = alignment
        slots = a.cursor.shape[0] - 1
        _route_align_kernel[(1,)](logits, logits.stride(0), T, w, ids, E, scale, log2phy, s_map, logcnt, phys, load,
                                  valid, slots, a.sorted_ids, a.block_expert, a.cursor, a.max_blocks,
                                  BLOCK_M=a.config.block_m, BINS=triton.next_power_of_2(slots + 1),
                                  CHUNK=max(16, triton.next_power_of_2(T * top_k)), num_warps=4, **common)
    elif T:
        _softmax_topk_kernel[(T,)](logits, logits.stride(0), w, ids, E, scale, log2phy, s_map, logcnt, phys, load,
                                   valid, MAP=expert_map is not None, num_warps=1, **common)
    return (w, ids) if expert_map is None else (w, ids, phys)


def to_physical_triton(ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                       expert_load: torch.Tensor, num_valid_tokens: torch.Tensor | None = None) -> torch.Tensor:
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    phys = torch.empty(flat.shape, dtype=log2phy.dtype, device=ids.device)
    n = flat.numel()
    if n:
        block = 256
        valid = num_valid_tokens if num_valid_tokens is not None else flat
        _physical_kernel[(triton.cdiv(n, block),)](flat, n, log2phy, log2phy.stride(0), logcnt, phys, expert_load,
                                                   valid, TOPK=ids.shape[-1] if ids.dim() > 1 else 1, BLOCK=block,
                                                   HAS_VALID=num_valid_tokens is not None, num_warps=2)
    return phys.view_as(ids)
