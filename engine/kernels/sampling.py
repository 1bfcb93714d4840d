"""Triton sampler: exact filter thresholds, Gumbel-max with in-kernel noise, and the
log-sum-exp for logprobs.

The reference (engine/ops/sampling.py) sorts each row to apply top-k / top-p / min-p.
Here each filter becomes one threshold per row, found without sorting by searching
the 32-bit order-preserving keys of the scaled logits (WAYS candidates per pass over
the row, so 32 / log2(WAYS) passes per filter):
  top-k: vk = the k-th largest value = the largest key with count(key >= c) >= k.
  top-p: over the top-k set (Z = its softmax mass, ties at vk counted k - count(> vk)
         times, like the reference's ranks), the kept values are those whose mass
         strictly ahead is < p, so the threshold is the smallest value v >= vk with
         sum_{x > v} e^(x - max) < p * Z.
  min-p: max + log(min_p).
Tokens whose scaled logit is >= the largest threshold are kept (ties kept, as in the
reference). Rows without filters, and greedy rows, skip the search.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MUL = 0x45D9F3B
SAMPLE_CHUNK = 8192


@triton.jit
def _mix32(x):
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def gumbel_noise(tok, pos_u32, seed_hi, seed_lo):
    """-log(-log(u)) for token ids `tok` (int32 tensor); the hash of engine/ops/sampling.py."""
    h = _mix32(pos_u32 ^ _mix32(tok.to(tl.uint32)))
    h = _mix32(seed_hi ^ h)
    h = _mix32(seed_lo ^ h)
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _key(x):
    """Order-preserving int64 key in [0, 2**32) of float32 values (-0.0 folded into +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(b >= 0, b + 2147483648, -b - 1)


@triton.jit
def _unkey(k):
    b = tl.where(k >= 2147483648, k - 2147483648, -k - 1)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _threshold_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, thr_ptr, V,
                      BLOCK: tl.constexpr, WAYS: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    t = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    mp = tl.load(minp_ptr + row)
    need_k = (k > 0) & (k < V)
    need_p = p < 1.0
    thr = tl.full([], float("-inf"), tl.float32)
    if (t > 0) & (need_k | need_p | (mp > 0)):
        offs = tl.arange(0, BLOCK)
        ways = tl.arange(0, WAYS).to(tl.int64)
        # Pass: max and min of the scaled row.
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        mn = tl.full([BLOCK], float("inf"), tl.float32)
        for off in range(0, V, BLOCK):
            m = off + offs < V
            x = tl.div_rn(tl.load(base + off + offs, mask=m, other=0.0).to(tl.float32), t)
            mx = tl.maximum(mx, tl.where(m, x, float("-inf")))
            mn = tl.minimum(mn, tl.where(m, x, float("inf")))
        x_max = tl.max(mx, 0)
        lo = tl.min(_key(mn), 0)
        if need_k:
            # Largest key c with count(key >= c) >= k: the k-th largest value.
            hi = _key(x_max)
            while lo < hi:
                step = (hi - lo) // WAYS + 1
                cand = lo + ways * step
                cnt = tl.zeros([WAYS], tl.int32)
                above = tl.zeros([BLOCK], tl.int32)
                for off in range(0, V, BLOCK):
                    m = off + offs < V
                    x = tl.div_rn(tl.load(base + off + offs, mask=m, other=0.0).to(tl.float32), t)
                    kx = tl.where(m, _key(x), -1)
                    # Keys above hi count for every candidate; only keys in [lo, hi] need
                    # the per-candidate compare, and after a pass or two few chunks have any.
                    above += (kx > hi).to(tl.int32)
                    inside = (kx >= lo) & (kx <= hi)
                    if tl.max(inside.to(tl.int32), 0) > 0:
                        cnt += tl.sum(((kx[:, None] >= cand[None, :]) & inside[:, None]).to(tl.int32), 0)
                cnt += tl.sum(above, 0)
                sel = tl.sum((cnt >= k).to(tl.int32), 0) - 1
                lo = lo + sel * step
                hi = tl.minimum(lo + step - 1, hi)
            thr = _unkey(lo)
        if need_p:
            vk = _unkey(lo)
            # Z: softmax mass of the top-k set (all of the row without top-k).
            z = tl.zeros([BLOCK], tl.float32)
            n_gt = tl.zeros([BLOCK], tl.int32)
            for off in range(0, V, BLOCK):
                m = off + offs < V
                x = tl.div_rn(tl.load(base + off + offs, mask=m, other=0.0).to(tl.float32), t)
                gt = m & (x > vk)
                z += tl.where(gt, tl.exp(x - x_max), 0.0)
                n_gt += gt.to(tl.int32)
            kk = tl.where(need_k, k, V)
            z_tot = tl.sum(z, 0) + (kk - tl.sum(n_gt, 0)).to(tl.float32) * tl.exp(vk - x_max)
            limit = p * z_tot
            # Smallest key c >= key(vk) with mass(key > c) < p * Z.
            hi = _key(x_max)
            while lo < hi:
                step = (hi - lo) // WAYS + 1
                cand = lo + ways * step
                mass = tl.zeros([WAYS], tl.float32)
                above = tl.zeros([BLOCK], tl.float32)
                for off in range(0, V, BLOCK):
                    m = off + offs < V
                    x = tl.div_rn(tl.load(base + off + offs, mask=m, other=0.0).to(tl.float32), t)
                    kx = tl.where(m, _key(x), -1)
                    e = tl.where(m, tl.exp(x - x_max), 0.0)
                    above += tl.where(kx > hi, e, 0.0)
                    inside = (kx >= lo) & (kx <= hi)
                    if tl.max(inside.to(tl.int32), 0) > 0:
                        hit = (kx[:, None] > cand[None, :]) & inside[:, None]
                        mass += tl.sum(tl.where(hit, e[:, None], 0.0), 0)
                mass += tl.sum(above, 0)
                sel = tl.sum((mass >= limit).to(tl.int32), 0)
                new_lo = tl.where(sel == 0, lo, lo + (sel - 1) * step + 1)
                new_hi = tl.where(sel == 0, lo, tl.where(sel == WAYS, hi, tl.minimum(lo + sel * step, hi)))
                lo = new_lo
                hi = new_hi
            # p <= 0 keeps only the top token (the reference's n_keep >= 1).
            thr = tl.where(p > 0, _unkey(lo), x_max)
        if mp > 0:
            thr = tl.maximum(thr, x_max + tl.log(mp))
    tl.store(thr_ptr + row, thr)


@triton.jit
def _gumbel_partial_kernel(logits_ptr, stride, temp_ptr, thr_ptr, seed_ptr, pos_ptr,
                           part_val_ptr, part_idx_ptr, V, NUM_CHUNKS, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    tok = chunk * BLOCK + tl.arange(0, BLOCK)
    m = tok < V
    logit = tl.load(logits_ptr + row.to(tl.int64) * stride + tok, mask=m, other=float("-inf")).to(tl.float32)
    t = tl.load(temp_ptr + row)
    if t > 0:
        seed = tl.load(seed_ptr + row).to(tl.int64)
        seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        pos = (tl.load(pos_ptr + row).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
        x = tl.div_rn(logit, t)
        keep = m & (x >= tl.load(thr_ptr + row))
        val = tl.where(keep, x + gumbel_noise(tok, pos, seed_hi, seed_lo), float("-inf"))
    else:
        val = logit
    best = tl.argmax(val, 0)
    best_val = tl.max(val, 0)
    tl.store(part_val_ptr + row * NUM_CHUNKS + chunk, best_val)
    tl.store(part_idx_ptr + row * NUM_CHUNKS + chunk, chunk * BLOCK + best)


@triton.jit
def _argmax_rows_kernel(part_val_ptr, part_idx_ptr, out_ptr, NUM_CHUNKS, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < NUM_CHUNKS
    v = tl.load(part_val_ptr + row * NUM_CHUNKS + c, mask=m, other=float("-inf"))
    best = tl.argmax(v, 0)   # first chunk among ties: the smallest token id wins, like torch
    idx = tl.load(part_idx_ptr + row * NUM_CHUNKS + best)
    tl.store(out_ptr + row, idx.to(tl.int64))


@triton.jit
def _lse_kernel(logits_ptr, stride, lse_ptr, V, BLOCK: tl.constexpr):
    """Online log-sum-exp of one row: no [B, V] softmax is ever written."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK)
    m_run = tl.full([BLOCK], float("-inf"), tl.float32)
    s_run = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        x = tl.load(base + off + offs, mask=off + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.exp(x - m_safe)
        m_run = m_new
    m = tl.max(m_run, 0)
    s = tl.sum(s_run * tl.exp(m_run - m), 0)
    tl.store(lse_ptr + row, m + tl.log(s))


def filter_thresholds(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[B] float32: row i keeps the tokens with logits[i] / temperature[i] >= thr[i]
    (-inf: no filter). Greedy rows get -inf too: they ignore filters."""
    B, V = logits.shape
    thr = torch.empty(B, dtype=torch.float32, device=logits.device)
    _threshold_kernel[(B,)](logits, logits.stride(0), temperature.to(torch.float32), top_k.to(torch.int32),
                            top_p.to(torch.float32), min_p.to(torch.float32), thr, V,
                            BLOCK=1024, WAYS=16, num_warps=8)
    return thr


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    dev = logits.device
    temperature = temperature.to(torch.float32)
    thr = filter_thresholds(logits, temperature, top_k, top_p, min_p)
    chunk = min(SAMPLE_CHUNK, triton.next_power_of_2(V))
    n_chunks = triton.cdiv(V, chunk)
    part_val = torch.empty(B, n_chunks, dtype=torch.float32, device=dev)
    part_idx = torch.empty(B, n_chunks, dtype=torch.int32, device=dev)
    _gumbel_partial_kernel[(B, n_chunks)](logits, logits.stride(0), temperature, thr, seeds, positions,
                                          part_val, part_idx, V, n_chunks, BLOCK=chunk, num_warps=8)
    out = torch.empty(B, dtype=torch.int64, device=dev)
    _argmax_rows_kernel[(B,)](part_val, part_idx, out, n_chunks,
                              BLOCK=max(2, triton.next_power_of_2(n_chunks)), num_warps=1)
    return out


def logsumexp_triton(logits: torch.Tensor) -> torch.Tensor:
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    lse = torch.empty(B, dtype=torch.float32, device=logits.device)
    _lse_kernel[(B,)](logits, logits.stride(0), lse, V, BLOCK=min(4096, triton.next_power_of_2(V)), num_warps=8)
    return lse
