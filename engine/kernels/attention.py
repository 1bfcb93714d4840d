"""Triton paged attention (GQA and MLA-as-MQA) and the KV-cache write.

One program takes BLOCK_Q query tokens of one request times HPP query heads of one
KV head: the heads that share a KV head are stacked along M, so a decode step still
feeds the tensor cores 16+ rows. Programs find their request by binary search over
query_start_loc (program g belongs to request i when qsl[i] // BLOCK_Q + i <= g), so
the grid needs only the token and request counts, not the host's per-request lists.

K is split into a power-of-two head D1 plus an optional power-of-two tail D2 (MLA:
512 latent + 64 rope dims); when V is the first DV dims of the K entry (MLA), the K
tile is reused as the V tile and the latent is read once. The query's tail D2 dims may
come from a tensor of their own (MLA's rotated q_pe), so the caller needs no cat.

Split-KV (flash-decoding): when query blocks alone cannot fill the GPU, each program
takes a share of the KV tiles and a second kernel merges the partial softmaxes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.mma import mma, upcast_dots

LOG2E = 1.4426950408889634


@triton.jit
def _find_request(qsl_ptr, num_reqs, g, BLOCK_Q: tl.constexpr):
    """Largest i < num_reqs with qsl[i] // BLOCK_Q + i <= g."""
    lo = num_reqs * 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= g
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit(do_not_specialize=["num_reqs"])
def _attn_kernel(q_ptr, sq_t, sq_h, q2_ptr, sq2_t, sq2_h, k_ptr, sk_b, sk_s, sk_h, v_ptr, sv_b, sv_s, sv_h,
                 o_ptr, so_t, so_h, po_ptr, pml_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, s_bt,
                 num_reqs, scale_log2,
                 BLOCK_SIZE: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, HPP: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_N: tl.constexpr, DK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 DV: tl.constexpr, DV_P2: tl.constexpr, SHARED_V: tl.constexpr, SPLIT: tl.constexpr,
                 UPCAST: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_Q * HPP
    g = tl.program_id(0)
    head_chunks: tl.constexpr = (G + HPP - 1) // HPP
    kvh = tl.program_id(1) // head_chunks
    hc = tl.program_id(1) % head_chunks
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    req = _find_request(qsl_ptr, num_reqs, g, BLOCK_Q)
    q_start = tl.load(qsl_ptr + req)
    n = tl.load(qsl_ptr + req + 1) - q_start
    q0 = (g - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if q0 >= n:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx = seq_len - n                       # cached tokens before this step's queries

    r = tl.arange(0, BLOCK_M)
    tok = q0 + r // HPP
    hig = hc * HPP + r % HPP
    row_ok = (tok < n) & (hig < G)
    head = kvh * G + hig
    q_pos = ctx + tok
    # The last query of this block sees keys up to kv_end - 1.
    kv_end = tl.minimum(seq_len, ctx + tl.minimum(q0 + BLOCK_Q, n))
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DV_P2)
    q_row = (q_start + tok).to(tl.int64) * sq_t + head * sq_h
    q1 = tl.load(q_ptr + q_row[:, None] + d1[None, :], mask=row_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if D2 > 0:
        d2 = tl.arange(0, D2)
        q2_row = (q_start + tok).to(tl.int64) * sq2_t + head * sq2_h
        q2 = tl.load(q2_ptr + q2_row[:, None] + d2[None, :], mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, DV_P2], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * s_bt
    # Block-table entries are prefetched one tile ahead, so the page lookup of the next
    # tile overlaps this tile's loads instead of stalling in front of them.
    kpos = t_begin * BLOCK_N + tl.arange(0, BLOCK_N)
    blk_next = tl.load(bt_row + kpos // BLOCK_SIZE, mask=kpos < kv_end, other=0)
    for tile in range(t_begin, t_end):
        kpos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = kpos < kv_end
        blk = blk_next.to(tl.int64)
        blk_next = tl.load(bt_row + (kpos + BLOCK_N) // BLOCK_SIZE, mask=kpos + BLOCK_N < kv_end, other=0)
        slot_in = (kpos % BLOCK_SIZE).to(tl.int64)
        k_off = blk * sk_b + slot_in * sk_s + kvh * sk_h
        k1 = tl.load(k_ptr + k_off[:, None] + d1[None, :], mask=k_ok[:, None] & (d1[None, :] < DK), other=0.0)
        s = mma(q1, tl.trans(k1), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST)
        if D2 > 0:
            k2 = tl.load(k_ptr + k_off[:, None] + D1 + d2[None, :], mask=k_ok[:, None], other=0.0)
            s = mma(q2, tl.trans(k2), s, UPCAST)
        visible = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SHARED_V:
            v = k1
        else:
            v_off = blk * sv_b + slot_in * sv_s + kvh * sv_h
            v = tl.load(v_ptr + v_off[:, None] + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new

    t_glob = (q_start + tok).to(tl.int64)
    if SPLIT:
        part = (t_glob * HQ + head) * num_splits + split
        tl.store(po_ptr + part[:, None] * DV_P2 + dv[None, :], acc, mask=row_ok[:, None])
        tl.store(pml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(pml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_row = t_glob * so_t + head * so_h
        tl.store(o_ptr + o_row[:, None] + dv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _merge_kernel(po_ptr, pml_ptr, o_ptr, so_t, so_h, num_splits,
                  HQ: tl.constexpr, S_P2: tl.constexpr, DV: tl.constexpr, DV_P2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, S_P2)
    s_ok = s < num_splits
    part = (t * HQ + h) * num_splits + s
    m = tl.load(pml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(pml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    dv = tl.arange(0, DV_P2)
    acc = tl.load(po_ptr + part[:, None] * DV_P2 + dv[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + t * so_t + h * so_h + dv, out.to(o_ptr.dtype.element_ty), mask=dv < DV)


@triton.jit
def _write_kv_kernel(val_ptr, sv_t, sv_h, cache_ptr, sc_b, sc_s, sc_h,
                     val2_ptr, sv2_t, sv2_h, cache2_ptr, sc2_b, sc2_s, sc2_h,
                     slot_ptr, block_size, H, D, D2,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PAIR: tl.constexpr):
    """One token per program; PAIR writes a second (values, cache) pair, V beside K,
    in the same launch."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    pos = slot % block_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h < H)[:, None] & (d < D)[None, :]
    v = tl.load(val_ptr + t * sv_t + h[:, None] * sv_h + d[None, :], mask=m)
    dst = cache_ptr + blk * sc_b + pos * sc_s + h[:, None] * sc_h + d[None, :]
    tl.store(dst, v.to(cache_ptr.dtype.element_ty), mask=m)
    if PAIR:
        d2 = tl.arange(0, BLOCK_D2)
        m2 = (h < H)[:, None] & (d2 < D2)[None, :]
        v2 = tl.load(val2_ptr + t * sv2_t + h[:, None] * sv2_h + d2[None, :], mask=m2)
        dst2 = cache2_ptr + blk * sc2_b + pos * sc2_s + h[:, None] * sc2_h + d2[None, :]
        tl.store(dst2, v2.to(cache2_ptr.dtype.element_ty), mask=m2)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4    # the interpreter: small, so tests exercise split-KV
    return torch.cuda.get_device_properties(device).multi_processor_count


class AttnConfig(NamedTuple):
    rows: int         # query rows per program: BLOCK_Q tokens x heads per program
    block_n: int      # keys per tile
    num_warps: int
    num_stages: int


def default_config(max_query_len: int, wide: bool) -> AttnConfig:
    """Spill-free on sm_90 per ptxas (Triton 3.6), the fastest of a sweep on one H200 at
    real shapes (benchmarks/RESULTS.md); wide = 512-wide latent rows (MLA)."""
    decode = max_query_len <= 4
    if wide:
        return AttnConfig(16, 32, 4, 2) if decode else AttnConfig(64, 16, 8, 2)
    return AttnConfig(16, 64, 4, 2) if decode else AttnConfig(128, 64, 8, 3)


def _smem_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30      # the interpreter has no shared memory to run out of
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 232448)


def fit_shared_memory(cfg: AttnConfig, dk: int, dv: int, elem: int, limit: int) -> AttnConfig:
    """Shrink a tile config until one program's tiles fit in shared memory: the query
    tile plus a K and a V tile per pipeline stage (head dims above 128 overflow the
    tuned configs). Configs that fit, as every tuned one at head dim <= 128 does, stay."""
    def need(c: AttnConfig) -> int:
        return c.rows * dk * elem + c.num_stages * c.block_n * (dk + dv) * elem
    while need(cfg) > limit:
        if cfg.num_stages > 2:
            cfg = cfg._replace(num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 16:
            cfg = cfg._replace(block_n=cfg.block_n // 2)
        elif cfg.rows > 16:
            cfg = cfg._replace(rows=cfg.rows // 2)
        else:
            break
    return cfg


class _Plan(NamedTuple):
    d1: int
    d2: int
    shared_v: bool
    cfg: AttnConfig
    hpp: int
    block_q: int
    grid: tuple[int, int, int]
    dv_p2: int


def head_split(dk: int) -> tuple[int, int]:
    """(D1, D2): a K head of dk dims as a power-of-two head and a power-of-two tail of at
    least 16 (576 = 512 + 64), or (next power of two, 0): one masked tile."""
    d1 = triton.next_power_of_2(dk)
    if d1 != dk and dk - d1 // 2 >= 16 and triton.next_power_of_2(dk - d1 // 2) == dk - d1 // 2:
        return d1 // 2, dk - d1 // 2
    return d1, 0


def _plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, config: AttnConfig | None,
          num_splits: int | None) -> _Plan:
    """Tiles, grid and split count of one launch; depends only on shapes and the step's
    maxima, so the runner's step computes it once for all layers (meta.plans)."""
    T, HQ = q.shape[:2]
    HKV, DK, DV = k_cache.shape[2], k_cache.shape[-1], v_cache.shape[-1]
    group = HQ // HKV
    d1, d2 = head_split(DK)
    shared_v = (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
                and DV == d1 and d2 > 0)
    max_q = meta.max_query_len or T
    wide = max(d1, DV) > 256
    cfg = config or fit_shared_memory(default_config(max_q, wide), d1 + d2, triton.next_power_of_2(DV),
                                      q.element_size(), _smem_limit(q.device))
    hpp = min(triton.next_power_of_2(group), cfg.rows, 16 if wide else 64)
    block_q, block_n = max(1, cfg.rows // hpp), cfg.block_n
    B = meta.num_reqs
    grid0 = T // block_q + B
    grid1 = HKV * triton.cdiv(group, hpp)
    if num_splits is None:
        num_splits = meta.num_splits
    active = min(grid0, B * triton.cdiv(max_q, block_q)) * grid1
    sms = _num_sms(q.device)
    if num_splits is None:
        # Split the KV only when the query blocks leave SMs idle and each program would
        # walk a long context: the merge launch costs more than it saves on short ones.
        tiles = triton.cdiv(meta.max_seq_len or 0, block_n)
        num_splits = 1
        if active < sms and tiles >= 32:
            num_splits = min(triton.next_power_of_2(triton.cdiv(sms, active)), 32,
                             1 << ((tiles // 16).bit_length() - 1))
    return _Plan(d1, d2, shared_v, cfg, hpp, block_q, (grid0, grid1, num_splits), triton.next_power_of_2(DV))


def graph_num_splits(num_reqs: int, num_q_heads: int, num_kv_heads: int, wide: bool, device: torch.device) -> int:
    """A fixed split count for a captured decode batch (the real lengths are unknown at
    capture): enough programs to cover the SMs; the kernel divides the step's real
    tiles among the splits, so short contexts leave the spare splits empty."""
    group = num_q_heads // num_kv_heads
    hpp = min(triton.next_power_of_2(group), 16)
    active = num_reqs * num_kv_heads * triton.cdiv(group, hpp)
    sms = _num_sms(device)
    return 1 if active >= sms else min(triton.next_power_of_2(triton.cdiv(sms, active)), 16 if wide else 32)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                           config: AttnConfig | None = None, num_splits: int | None = None,
                           q_rope: torch.Tensor | None = None) -> torch.Tensor:
    """q_rope: the query's last D2 dims as a tensor of their own (head_split(dk) must
    cut the head there), read as if cat([q, q_rope], -1)."""
    T, HQ = q.shape[:2]
    HKV, DK, DV = k_cache.shape[2], k_cache.shape[-1], v_cache.shape[-1]
    out = q.new_empty(T, HQ, DV)
    if T == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    if config is None and num_splits is None:
        key = (T, HQ, DK, HKV, DV, k_cache.data_ptr() == v_cache.data_ptr())
        plan = meta.plans.get(key)
        if plan is None:
            plan = meta.plans[key] = _plan(q, k_cache, v_cache, meta, None, None)
    else:
        plan = _plan(q, k_cache, v_cache, meta, config, num_splits)
    if q_rope is None:
        q2 = q[..., plan.d1:] if plan.d2 else q
    else:
        assert (q.shape[-1], q_rope.shape[-1]) == (plan.d1, plan.d2), "q_rope must be K's tail tile"
        q2 = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    cfg, num_splits = plan.cfg, plan.grid[2]
    split = num_splits > 1
    if split:
        po = torch.empty(T, HQ, num_splits, plan.dv_p2, dtype=torch.float32, device=q.device)
        pml = torch.empty(T, HQ, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        po = pml = out
    _attn_kernel[plan.grid](
        q, q.stride(0), q.stride(1), q2, q2.stride(0), q2.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out, out.stride(0), out.stride(1),
        po, pml, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.block_table.stride(0),
        meta.num_reqs, scale * LOG2E, BLOCK_SIZE=meta.block_size, HQ=HQ, G=HQ // HKV, HPP=plan.hpp,
        BLOCK_Q=plan.block_q, BLOCK_N=cfg.block_n, DK=DK, D1=plan.d1, D2=plan.d2, DV=DV, DV_P2=plan.dv_p2,
        SHARED_V=plan.shared_v, SPLIT=split, UPCAST=upcast_dots(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if split:
        _merge_kernel[(T, HQ)](po, pml, out, out.stride(0), out.stride(1), num_splits,
                               HQ=HQ, S_P2=max(2, triton.next_power_of_2(num_splits)), DV=DV, DV_P2=plan.dv_p2,
                               num_warps=4)
    return out


def write_kv_triton(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                    cache2: torch.Tensor | None = None, values2: torch.Tensor | None = None) -> None:
    """cache[slot] = values (and cache2[slot] = values2, same heads) for every token
    whose slot is not -1."""
    T, H, D = values.shape
    if T == 0:
        return
    if values.stride(-1) != 1:
        values = values.contiguous()
    assert cache.stride(-1) == 1, "cache rows must be contiguous"
    pair = values2 is not None
    if pair:
        if values2.stride(-1) != 1:
            values2 = values2.contiguous()
        assert cache2.stride(-1) == 1 and values2.shape[:2] == values.shape[:2]
    else:
        cache2, values2 = cache, values
    D2 = values2.shape[-1]
    _write_kv_kernel[(T,)](values, values.stride(0), values.stride(1), cache, cache.stride(0), cache.stride(1),
                           cache.stride(2), values2, values2.stride(0), values2.stride(1), cache2,
                           cache2.stride(0), cache2.stride(1), cache2.stride(2), slot_mapping, block_size, H, D, D2,
                           BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
                           BLOCK_D2=triton.next_power_of_2(D2), PAIR=pair, num_warps=4)
