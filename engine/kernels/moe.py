"""Triton fused mixture-of-experts: align, two grouped GEMMs, combine; no host sync.

1. `_align_kernel` (one program): counts the (token, slot) entries per expert with a
   histogram (id -1: no expert, the entry is skipped), pads each expert's run to a multiple of BLOCK_M, writes which expert
   owns each BLOCK_M-row block (-1: unused), and scatters the entry ids into their
   expert's run through per-expert atomic cursors. The order inside a run is not
   fixed, and need not be: every row of a GEMM is computed independently.
2. `_w13_kernel`: per tile, gate and up tiles of x[token] @ w13[e]^T with SiLU(gate)
   * up fused (or, not gated, relu(up)^2), into the block-sorted intermediate.
3. `_w2_kernel`: intermediate @ w2[e]^T times the routing weight, to the entry's row:
   a local one, or (expert parallelism, engine/layers/ep_low_latency.py) the row of
   the rank that sent the token, written straight into its peer-mapped memory.
4. `_combine_kernel`: the k rows of each token summed in float32 (and, for DeepSeek, the
   shared experts' output added, as torch adds two tensors: no launch of its own).
The grid is sized from an upper bound on the block count, floor(N / BLOCK_M) +
min(E, N) for N entries, so nothing is read back to size it; align writes the count
in use after the experts' cursors, and tiles past it exit.

How the GEMMs walk their tiles is per call (MoEConfig, tuned per token count):
- GROUP_SIZE_M (`group_m`): tile t runs m-block-fastest inside groups of that many
  m-blocks, as vLLM's kernel does. 0: one group of every block (one weight column
  of tiles after another), which re-reads the activations from memory once per column
  of tiles at prefill sizes; small groups keep a block's rows and its expert's weights
  in L2 while every column of that block is computed.
- `persistent`: that many programs per SM, each looping over tiles (no tail of
  short-lived programs; `flatten` asks Triton to pipeline across tile boundaries).
- `tma`: weight tiles (contiguous per expert) by tensor descriptors, which Hopper
  loads with its copy engine; the activation rows are gathered, so they stay pointer
  loads.
- `down_block_n`: w2's own N tile; with one accumulator (w13 has gate and up) it has
  room for twice the columns, which halves its reads of the intermediate per FLOP.
"""

from __future__ import annotations

import functools
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
    tl.store(cursor_ptr + E, total // BLOCK_M)      # blocks in use: the GEMMs' tile count
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
    row_ok = rows < tl.load(cursor_ptr + e)       # the end of expert e's valid rows
    entry = tl.load(sorted_ptr + rows, mask=row_ok, other=0)
    return e, rows, row_ok, entry


@triton.jit
def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(m-block, n-block) of tile `tile`: m fastest inside groups of GROUP_M blocks
    (0: a single group)."""
    if GROUP_M == 0:
        return tile % num_m, tile // num_m
    per_group = GROUP_M * num_n
    first = tile // per_group * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    return first + tile % per_group % size, tile % per_group // size


@triton.jit
def _weight_tile(w, ptrs, row, kk, k_ok, n_ok, TMA: tl.constexpr):
    """[BLOCK_K, BLOCK_N] of an expert's weight: by TMA, rows row.. and columns kk.. of
    the [E * rows, K] matrix (out-of-range reads give zeros); else by pointers."""
    if TMA:
        tile = w.load([row, kk]).T
    else:
        tile = tl.load(ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tile


@triton.jit(do_not_specialize=["max_blocks"])
def _w13_kernel(x_ptr, sx_t, w, sw_e, sw_n, inter_ptr, s_inter, block_expert_ptr, cursor_ptr, sorted_ptr,
                H, I, E, max_blocks, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr, GROUP_M: tl.constexpr,
                PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, TMA: tl.constexpr):
    num_m = tl.load(cursor_ptr + E)
    num_n = tl.cdiv(I, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
            _w13_tile(tile, num_m, num_n, x_ptr, sx_t, w, sw_e, sw_n, inter_ptr, s_inter, block_expert_ptr,
                      cursor_ptr, sorted_ptr, H, I, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, GATED, GROUP_M, TMA)
    elif tl.program_id(0) < num_m * num_n:
        _w13_tile(tl.program_id(0), num_m, num_n, x_ptr, sx_t, w, sw_e, sw_n, inter_ptr, s_inter,
                  block_expert_ptr, cursor_ptr, sorted_ptr, H, I, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
                  GATED, GROUP_M, TMA)


@triton.jit
def _w13_tile(tile, num_m, num_n, x_ptr, sx_t, w, sw_e, sw_n, inter_ptr, s_inter, block_expert_ptr, cursor_ptr,
              sorted_ptr, H, I, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr, GROUP_M: tl.constexpr,
              TMA: tl.constexpr):
    pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
    e, rows, row_ok, entry = _block_rows(block_expert_ptr, cursor_ptr, sorted_ptr, pid_m, BLOCK_M)
    tok = (entry // TOPK).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * sx_t + k[None, :]
    # TMA: the expert's gate rows start at row e * rows_per_expert of w13 seen as [E * rows, H].
    g_row = e * (2 * I if GATED else I) + pid_n * BLOCK_N
    g_ptrs = a_ptrs      # unused with TMA
    if not TMA:
        g_ptrs = w + e.to(tl.int64) * sw_e + (n[None, :] * sw_n + k[:, None])
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, H, BLOCK_K):
        k_ok = k < H - kk
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if GATED:
            wg = _weight_tile(w, g_ptrs, g_row, kk, k_ok, n_ok, TMA)
            wu = _weight_tile(w, g_ptrs + I * sw_n, g_row + I, kk, k_ok, n_ok, TMA)
            gate = mma(a, wg, gate, UPCAST)
            up = mma(a, wu, up, UPCAST)
        else:       # the only rows are the up rows
            wu = _weight_tile(w, g_ptrs, g_row, kk, k_ok, n_ok, TMA)
            up = mma(a, wu, up, UPCAST)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    if GATED:
        act = gate / (1.0 + tl.exp(-gate)) * up
    else:
        act = tl.maximum(up, 0.0)
        act = act * act
    dst = inter_ptr + rows[:, None].to(tl.int64) * s_inter + n[None, :]
    tl.store(dst, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["max_blocks"])
def _w2_kernel(inter_ptr, s_inter, w, sw_e, sw_n, out_ptr, s_out, peer_ptrs, rows_per_peer, topk_w_ptr,
               block_expert_ptr, cursor_ptr, sorted_ptr, H, I, E, max_blocks, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, TO_PEERS: tl.constexpr,
               GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, TMA: tl.constexpr):
    num_m = tl.load(cursor_ptr + E)
    num_n = tl.cdiv(H, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
            _w2_tile(tile, num_m, num_n, inter_ptr, s_inter, w, sw_e, sw_n, out_ptr, s_out, peer_ptrs,
                     rows_per_peer, topk_w_ptr, block_expert_ptr, cursor_ptr, sorted_ptr, H, I, BLOCK_M, BLOCK_N,
                     BLOCK_K, UPCAST, TO_PEERS, GROUP_M, TMA)
    elif tl.program_id(0) < num_m * num_n:
        _w2_tile(tl.program_id(0), num_m, num_n, inter_ptr, s_inter, w, sw_e, sw_n, out_ptr, s_out, peer_ptrs,
                 rows_per_peer, topk_w_ptr, block_expert_ptr, cursor_ptr, sorted_ptr, H, I, BLOCK_M, BLOCK_N,
                 BLOCK_K, UPCAST, TO_PEERS, GROUP_M, TMA)


@triton.jit
def _w2_tile(tile, num_m, num_n, inter_ptr, s_inter, w, sw_e, sw_n, out_ptr, s_out, peer_ptrs, rows_per_peer,
             topk_w_ptr, block_expert_ptr, cursor_ptr, sorted_ptr, H, I, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, TO_PEERS: tl.constexpr,
             GROUP_M: tl.constexpr, TMA: tl.constexpr):
    pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
    e, rows, row_ok, entry = _block_rows(block_expert_ptr, cursor_ptr, sorted_ptr, pid_m, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows[:, None].to(tl.int64) * s_inter + k[None, :]
    b_row = e * H + pid_n * BLOCK_N           # TMA: w2 seen as [E * H, I]
    b_ptrs = a_ptrs      # unused with TMA
    if not TMA:
        b_ptrs = w + e.to(tl.int64) * sw_e + (n[None, :] * sw_n + k[:, None])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, I, BLOCK_K):
        k_ok = k < I - kk
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = _weight_tile(w, b_ptrs, b_row, kk, k_ok, n_ok, TMA)
        acc = mma(a, b, acc, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    w_route = tl.load(topk_w_ptr + entry, mask=row_ok, other=0.0).to(tl.float32)
    if TO_PEERS:
        # Entry e came from peer e // rows_per_peer, as its row e % rows_per_peer.
        peer = tl.load(peer_ptrs + entry // rows_per_peer, mask=row_ok, other=0)
        base = peer.to(tl.pointer_type(out_ptr.dtype.element_ty))
        dst = base[:, None] + (entry % rows_per_peer)[:, None].to(tl.int64) * s_out + n[None, :]
    else:
        dst = out_ptr + entry[:, None].to(tl.int64) * s_out + n[None, :]
    tl.store(dst, (acc * w_route[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, add_ptr, H, TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
                    ADD: tl.constexpr):
    """out[t] = sum of the token's TOPK expert rows, in float32 (rows in slot order;
    rows of id -1 were never written and count as zero); ADD: then + add[t], the sum
    rounded to the dtype first, as `combined + add` rounds it."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(TOPK):
        used = h * 0 + tl.load(ids_ptr + t * TOPK + k) >= 0
        acc += tl.load(y_ptr + (t * TOPK + k) * H + h, mask=m & used, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if ADD:
        add = tl.load(add_ptr + t * H + h, mask=m, other=0.0)
        out = (out.to(tl.float32) + add.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * H + h, out, mask=m)


class MoEConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 0          # GROUP_SIZE_M: m-blocks per group of the tile order (0: all)
    persistent: int = 0       # programs per SM, each looping over tiles (0: a program per tile)
    flatten: bool = False     # persistent: pipeline across tiles (Triton's loop flattening)
    tma: bool = False         # weight tiles by tensor descriptors (TMA on Hopper)
    down_block_n: int = 0     # the down projection's N tile (0: block_n); it has one accumulator, w13 two


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
    """The tuned config (tiles and walk) for this shape and device where a data file has
    one, else the heuristic above (plain walk)."""
    t = moe_configs.tuned(num_tokens, num_experts, intermediate, device)
    if t is None:
        return default_config(num_tokens * top_k, num_experts)
    return MoEConfig(t["BLOCK_SIZE_M"], t["BLOCK_SIZE_N"], t["BLOCK_SIZE_K"], t["num_warps"], t["num_stages"],
                     t.get("GROUP_SIZE_M", 0), t.get("persistent", 0), t.get("flatten", False), t.get("tma", False),
                     t.get("BLOCK_SIZE_N_DOWN", 0))


def config_entry(cfg: MoEConfig) -> dict:
    """A config as a data file writes it (moe_config reads it back)."""
    return dict(BLOCK_SIZE_M=cfg.block_m, BLOCK_SIZE_N=cfg.block_n, BLOCK_SIZE_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, GROUP_SIZE_M=cfg.group_m,
                persistent=cfg.persistent, flatten=cfg.flatten, tma=cfg.tma, BLOCK_SIZE_N_DOWN=cfg.down_block_n)


@functools.cache
def _num_sms(device: torch.device) -> int:
    # The interpreter (CPU) gets a few programs, so each loops over several tiles.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _grid(cfg: MoEConfig, max_blocks: int, num_n: int, device: torch.device) -> tuple[int]:
    tiles = max_blocks * num_n
    return (min(tiles, cfg.persistent * _num_sms(device)) if cfg.persistent else tiles,)


def _weights(w: torch.Tensor, cfg: MoEConfig, block_n: int) -> torch.Tensor | object:
    """The weight operand: [E, rows, K] itself, or with cfg.tma a tensor descriptor of it
    as [E * rows, K] in [block_n, cfg.block_k] tiles. TMA needs a contiguous tensor with
    16-byte aligned rows; other weights take the pointer loads (same results)."""
    if not (cfg.tma and w.is_contiguous() and w.data_ptr() % 16 == 0 and w.shape[-1] * w.element_size() % 16 == 0):
        return w
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [block_n, cfg.block_k])


class PeerRows(NamedTuple):
    """Where per-entry outputs go under expert parallelism: entry e is row
    e % rows_per_peer of the buffer at address ptrs[e // rows_per_peer] (int64, on the
    device), rows of `row_stride` elements."""
    ptrs: torch.Tensor
    rows_per_peer: int
    row_stride: int


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, config: MoEConfig | None = None,
                     activation: str = "silu", alignment: Alignment | None = None,
                     shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H]: each token's weighted expert outputs summed (ids of -1 add nothing), plus
    shared_out [T, H] when given."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    if T * top_k == 0:
        return torch.zeros_like(x) if shared_out is None else torch.zeros_like(x) + shared_out
    out = moe_entries_triton(x, w13, w2, topk_ids, topk_weights, config, activation=activation, alignment=alignment)
    combined = torch.empty(T, H, dtype=x.dtype, device=x.device)
    block_h = min(1024, triton.next_power_of_2(H))
    add = combined if shared_out is None else shared_out.contiguous()
    assert add.dtype == x.dtype and add.shape == combined.shape
    _combine_kernel[(T, triton.cdiv(H, block_h))](out, topk_ids.reshape(-1), combined, add, H, TOPK=top_k,
                                                  BLOCK_H=block_h, ADD=shared_out is not None, num_warps=4)
    return combined


class Alignment(NamedTuple):
    """What `_align_kernel` writes for one call, and the tiles it is for: the entries
    sorted by expert in BLOCK_M-row blocks (sorted_ids), each block's expert, and the
    experts' cursors then the block count. The routing kernel may fill it
    (engine/kernels/router.py) so that the MoE skips its own align launch."""
    config: MoEConfig
    max_blocks: int
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    cursor: torch.Tensor


def plan_alignment(x: torch.Tensor, w13: torch.Tensor, top_k: int, config: MoEConfig | None = None,
                   activation: str = "silu") -> Alignment:
    """The tiles for these tokens and empty buffers for their alignment."""
    T = x.shape[0]
    E, rows, _ = w13.shape
    inter = rows // 2 if activation == "silu" else rows
    N = T * top_k
    cfg = config or moe_config(T, top_k, E, inter, x.device)
    if config is None and x.element_size() > 2:
        cfg = cfg._replace(block_k=cfg.block_k // 2)      # float32 (tests): same tiles in bytes
    bm, dev = cfg.block_m, x.device
    max_blocks = N // bm + min(E, N)
    return Alignment(cfg, max_blocks, torch.empty(max_blocks * bm, dtype=torch.int32, device=dev),
                     torch.empty(max_blocks, dtype=torch.int32, device=dev),
                     torch.empty(E + 1, dtype=torch.int32, device=dev))    # experts' row ends, then the block count


def moe_entries_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor, config: MoEConfig | None = None,
                       to_peers: PeerRows | None = None, activation: str = "silu",
                       alignment: Alignment | None = None) -> torch.Tensor | None:
    """Each (token, choice) entry's weighted expert output, uncombined: [T * k, H] in
    entry order (rows of id -1 are left unwritten), or with to_peers written into the
    peers' buffers (returns None). alignment: already filled for topk_ids (no align
    launch here)."""
    T, H = x.shape
    E, rows, _ = w13.shape
    gated = activation == "silu"
    inter = rows // 2 if gated else rows
    top_k = topk_ids.shape[1]
    N = T * top_k
    dev = x.device
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1, "expert weights must have contiguous rows"
    filled = alignment is not None
    cfg, max_blocks, sorted_ids, block_expert, cursor = alignment or plan_alignment(x, w13, top_k, config, activation)
    bm = cfg.block_m
    if not filled:
        _align_kernel[(1,)](topk_ids.reshape(-1), N, E, sorted_ids, block_expert, cursor, max_blocks, BLOCK_M=bm,
                            BINS=triton.next_power_of_2(E + 1), CHUNK=1024, BCHUNK=64, num_warps=8)
    act = torch.empty(max_blocks * bm, inter, dtype=x.dtype, device=dev)
    up = upcast_dots()
    bn2 = cfg.down_block_n or cfg.block_n
    w13_op, w2_op = _weights(w13, cfg, cfg.block_n), _weights(w2, cfg, bn2)
    walk = dict(GROUP_M=cfg.group_m, PERSISTENT=cfg.persistent > 0, FLATTEN=cfg.flatten,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _w13_kernel[_grid(cfg, max_blocks, triton.cdiv(inter, cfg.block_n), dev)](
        x, x.stride(0), w13_op, w13.stride(0), w13.stride(1), act, act.stride(0), block_expert, cursor, sorted_ids,
        H, inter, E, max_blocks, TOPK=top_k, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=up,
        GATED=gated, TMA=w13_op is not w13, **walk)
    if to_peers is None:
        out = torch.empty(N, H, dtype=x.dtype, device=dev)
        peer_ptrs, rows_per_peer, stride = sorted_ids, 1, out.stride(0)    # peer args unused
    else:
        out, peer_ptrs, rows_per_peer, stride = x, to_peers.ptrs, to_peers.rows_per_peer, to_peers.row_stride
    weights = topk_weights.reshape(-1)
    _w2_kernel[_grid(cfg, max_blocks, triton.cdiv(H, bn2), dev)](
        act, act.stride(0), w2_op, w2.stride(0), w2.stride(1), out, stride, peer_ptrs, rows_per_peer, weights,
        block_expert, cursor, sorted_ids, H, inter, E, max_blocks, BLOCK_M=bm, BLOCK_N=bn2,
        BLOCK_K=cfg.block_k, UPCAST=up, TO_PEERS=to_peers is not None, TMA=w2_op is not w2, **walk)
    return out if to_peers is None else None
