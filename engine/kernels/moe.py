"""Triton fused mixture-of-experts: align, two grouped GEMMs, combine; no host sync.

1. `_align_kernel` (one program): counts the (token, slot) entries per expert with a
   histogram (id -1: no expert, the entry is skipped), pads each expert's run to a multiple of BLOCK_M, writes which expert
   owns each BLOCK_M-row block (-1: unused), and scatters the entry ids into their
   expert's run through per-expert atomic cursors. The order inside a run is not
   fixed, and need not be: every row of a GEMM is computed independently.
2. `_w13_kernel`: per block, gate and up tiles of x[token] @ w13[e]^T with SiLU(gate)
   * up fused (or, not gated, relu(up)^2), into the block-sorted intermediate.
3. `_w2_kernel`: intermediate @ w2[e]^T times the routing weight, to the entry's row:
   a local one, or (expert parallelism, engine/layers/ep_low_latency.py) the row of
   the rank that sent the token, written straight into its peer-mapped memory.
4. `_combine_kernel`: the k rows of each token summed in float32.
The grid is sized from an upper bound on the block count, floor(N / BLOCK_M) +
min(E, N) for N entries, so nothing is read back to size it; unused blocks exit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels import moe_configs
from engine.kernels.mma import mma, upcast_dots


@triton.jit(do_not_specialize=["N", "max_blocks"])
def _align_kernel(ids_ptr, N, E, sorted_ptr, block_expert_ptr, cursor_ptr, max_blocks,
                  BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr):
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([BINS], tl.int32)
    for off in range(0, N, CHUNK):
        idx = off + offs
        e = tl.load(ids_ptr + idx, mask=idx < N, other=E).to(tl.int32)
        counts += tl.histogram(tl.where(e < 0, E, e), BINS)     # bin E: padding and id -1, dropped
    bins = tl.arange(0, BINS)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(cursor_ptr + bins, starts, mask=bins < E)
    # Block b belongs to the expert whose padded run contains row b * BLOCK_M: the
    # number of experts whose run ends at or before that row.
    boffs = tl.arange(0, BCHUNK)
    for boff in range(0, max_blocks, BCHUNK):
        b = boff + boffs
        row = b * BLOCK_M
        owner = tl.sum(((ends[None, :] <= row[:, None]) & (bins[None, :] < E)).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, tl.where(row < total, owner, -1), mask=b < max_blocks)
    tl.debug_barrier()   # the cursors above must be visible to every thread's atomics
    for off in range(0, N, CHUNK):
        idx = off + offs
        e = tl.load(ids_ptr + idx, mask=idx < N, other=-1).to(tl.int32)
        m = e >= 0
        dest = tl.atomic_add(cursor_ptr + e, 1, mask=m)
        tl.store(sorted_ptr + dest, idx, mask=m)
    # Afterwards cursor[e] = start[e] + count[e]: the end of expert e's valid rows.


@triton.jit
def _block_rows(block_expert_ptr, cursor_ptr, sorted_ptr, pid_m, BLOCK_M: tl.constexpr):
    e = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Unused blocks (e = -1) start at or past every expert's end, so no row is valid.
    row_ok = rows < tl.load(cursor_ptr + tl.maximum(e, 0))
    entry = tl.load(sorted_ptr + rows, mask=row_ok, other=0)
    return e, rows, row_ok, entry


@triton.jit
def _w13_kernel(x_ptr, sx_t, w_ptr, sw_e, sw_n, inter_ptr, s_inter, block_expert_ptr, cursor_ptr, sorted_ptr,
                H, I, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows, row_ok, entry = _block_rows(block_expert_ptr, cursor_ptr, sorted_ptr, pid_m, BLOCK_M)
    if e < 0:
        return
    tok = (entry // TOPK).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * sx_t + k[None, :]
    w_base = w_ptr + e.to(tl.int64) * sw_e
    g_ptrs = w_base + (n[None, :] * sw_n + k[:, None])
    u_ptrs = g_ptrs + I * sw_n
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, H, BLOCK_K):
        k_ok = k < H - kk
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if GATED:
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            gate = mma(a, wg, gate, UPCAST)
            up = mma(a, wu, up, UPCAST)
        else:       # the only rows are the up rows
            wu = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            up = mma(a, wu, up, UPCAST)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if GATED:
        act = gate / (1.0 + tl.exp(-gate)) * up
    else:
        act = tl.maximum(up, 0.0)
        act = act * act
    dst = inter_ptr + rows[:, None].to(tl.int64) * s_inter + n[None, :]
    tl.store(dst, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _w2_kernel(inter_ptr, s_inter, w_ptr, sw_e, sw_n, out_ptr, s_out, peer_ptrs, rows_per_peer, topk_w_ptr,
               block_expert_ptr, cursor_ptr, sorted_ptr, H, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, TO_PEERS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows, row_ok, entry = _block_rows(block_expert_ptr, cursor_ptr, sorted_ptr, pid_m, BLOCK_M)
    if e < 0:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows[:, None].to(tl.int64) * s_inter + k[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * sw_e + (n[None, :] * sw_n + k[:, None])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, I, BLOCK_K):
        k_ok = k < I - kk
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    w = tl.load(topk_w_ptr + entry, mask=row_ok, other=0.0).to(tl.float32)
    if TO_PEERS:
        # Entry e came from peer e // rows_per_peer, as its row e % rows_per_peer.
        peer = tl.load(peer_ptrs + entry // rows_per_peer, mask=row_ok, other=0)
        base = peer.to(tl.pointer_type(out_ptr.dtype.element_ty))
        dst = base[:, None] + (entry % rows_per_peer)[:, None].to(tl.int64) * s_out + n[None, :]
    else:
        dst = out_ptr + entry[:, None].to(tl.int64) * s_out + n[None, :]
    tl.store(dst, (acc * w[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, H, TOPK: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum of the token's TOPK expert rows, in float32 (rows in slot order;
    rows of id -1 were never written and count as zero)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(TOPK):
        used = h * 0 + tl.load(ids_ptr + t * TOPK + k) >= 0
        acc += tl.load(y_ptr + (t * TOPK + k) * H + h, mask=m & used, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=m)


class MoEConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(num_entries: int, num_experts: int) -> MoEConfig:
    """Tiles by entries per expert, from a sweep on one H200 (benchmarks/RESULTS.md):
    few rows (decode) stream weights with small tiles and many programs; many rows are
    matrix-bound and want large tiles."""
    per_expert = num_entries / num_experts
    if per_expert <= 8:
        return MoEConfig(16, 32, 128, 4, 4)
    if per_expert <= 48:
        return MoEConfig(32, 64, 128, 4, 4)
    return MoEConfig(128, 128, 64, 8, 3)


def moe_config(num_tokens: int, top_k: int, num_experts: int, intermediate: int, device: torch.device) -> MoEConfig:
    """The tuned tiles for this shape and device where a data file has them, else the
    heuristic above."""
    t = moe_configs.tuned(num_tokens, num_experts, intermediate, device)
    if t is None:
        return default_config(num_tokens * top_k, num_experts)
    return MoEConfig(t["BLOCK_SIZE_M"], t["BLOCK_SIZE_N"], t["BLOCK_SIZE_K"], t["num_warps"], t["num_stages"])


class PeerRows(NamedTuple):
    """Where per-entry outputs go under expert parallelism: entry e is row
    e % rows_per_peer of the buffer at address ptrs[e // rows_per_peer] (int64, on the
    device), rows of `row_stride` elements."""
    ptrs: torch.Tensor
    rows_per_peer: int
    row_stride: int


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, config: MoEConfig | None = None,
                     activation: str = "silu") -> torch.Tensor:
    """[T, H]: each token's weighted expert outputs summed (ids of -1 add nothing)."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    if T * top_k == 0:
        return torch.zeros_like(x)
    out = moe_entries_triton(x, w13, w2, topk_ids, topk_weights, config, activation=activation)
    combined = torch.empty(T, H, dtype=x.dtype, device=x.device)
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](out, topk_ids.reshape(-1), combined, H, TOPK=top_k,
                                                  BLOCK_H=block_h, num_warps=4)
    return combined


def moe_entries_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor, config: MoEConfig | None = None,
                       to_peers: PeerRows | None = None, activation: str = "silu") -> torch.Tensor | None:
    """Each (token, choice) entry's weighted expert output, uncombined: [T * k, H] in
    entry order (rows of id -1 are left unwritten), or with to_peers written into the
    peers' buffers (returns None)."""
    T, H = x.shape
    E, rows, _ = w13.shape
    gated = activation == "silu"
    inter = rows // 2 if gated else rows
    top_k = topk_ids.shape[1]
    N = T * top_k
    cfg = config or moe_config(T, top_k, E, inter, x.device)
    if config is None and x.element_size() > 2:
        cfg = cfg._replace(block_k=cfg.block_k // 2)      # float32 (tests): same tiles in bytes
    bm = cfg.block_m
    dev = x.device
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1, "expert weights must have contiguous rows"
    ids = topk_ids.reshape(-1)
    max_blocks = N // bm + min(E, N)
    sorted_ids = torch.empty(max_blocks * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    cursor = torch.empty(E, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](ids, N, E, sorted_ids, block_expert, cursor, max_blocks, BLOCK_M=bm,
                        BINS=triton.next_power_of_2(E + 1), CHUNK=1024, BCHUNK=64, num_warps=8)
    act = torch.empty(max_blocks * bm, inter, dtype=x.dtype, device=dev)
    up = upcast_dots()
    _w13_kernel[(max_blocks, triton.cdiv(inter, cfg.block_n))](
        x, x.stride(0), w13, w13.stride(0), w13.stride(1), act, act.stride(0), block_expert, cursor, sorted_ids,
        H, inter, TOPK=top_k, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=up, GATED=gated,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if to_peers is None:
        out = torch.empty(N, H, dtype=x.dtype, device=dev)
        peer_ptrs, rows_per_peer, stride = sorted_ids, 1, out.stride(0)    # peer args unused
    else:
        out, peer_ptrs, rows_per_peer, stride = x, to_peers.ptrs, to_peers.rows_per_peer, to_peers.row_stride
    weights = topk_weights.reshape(-1)
    _w2_kernel[(max_blocks, triton.cdiv(H, cfg.block_n))](
        act, act.stride(0), w2, w2.stride(0), w2.stride(1), out, stride, peer_ptrs, rows_per_peer, weights,
        block_expert, cursor, sorted_ids, H, inter, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=up, TO_PEERS=to_peers is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if to_peers is None else None
