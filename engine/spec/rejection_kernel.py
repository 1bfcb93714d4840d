"""Triton rejection sampler: one program per request walks its rows in order and stops
at the first rejection, so per-request draft counts never reach the host. The
semantics and the noise are those of rejection_sample_ref (engine/spec/rejection.py);
each row costs two passes over the vocabulary for random rows (max/sum, then the
Gumbel argmax, skipped when the draft is accepted), one for greedy rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.sampling import _mix32, gumbel_noise


@triton.jit
def _accept_uniform(pos_u32, seed_hi, seed_lo):
    h = _mix32(pos_u32 ^ _mix32(tl.full([], 0xFFFFFFFF, tl.uint32)))
    h = _mix32(seed_hi ^ h)
    h = _mix32(seed_lo ^ h)
    return ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _rejection_kernel(logits_ptr, stride_l, start_ptr, ndraft_ptr, draft_ptr, stride_d,
                      q_ptr, stride_qb, stride_qk, temp_ptr, thr_ptr, seed_ptr, pos_ptr,
                      out_ptr, stride_o, out_cols, nsamp_ptr, V,
                      HAS_Q: tl.constexpr, HAS_THR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_COLS: tl.constexpr):
    req = tl.program_id(0)
    n = tl.load(ndraft_ptr + req).to(tl.int32)
    start = tl.load(start_ptr + req).to(tl.int64)
    t = tl.load(temp_ptr + req).to(tl.float32)
    seed = tl.load(seed_ptr + req).to(tl.int64)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    pos0 = tl.load(pos_ptr + req).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    alive = tl.full([], 1, tl.int32)
    count = tl.full([], 0, tl.int32)
    for j in range(0, n + 1):
        if alive != 0:
            base = logits_ptr + (start + j) * stride_l
            pos = ((pos0 + j) & 0xFFFFFFFF).to(tl.uint32)
            is_draft = j < n
            # Draft column j, clamped into the row (the bonus row has no draft of its own).
            col = tl.maximum(tl.minimum(j, n - 1), 0)
            d = tl.load(draft_ptr + req.to(tl.int64) * stride_d + col).to(tl.int32)
            q_row = q_ptr + req.to(tl.int64) * stride_qb + col * stride_qk
            token = d
            accepted = tl.full([], 0, tl.int32)
            if t > 0:
                thr = float("-inf")
                if HAS_THR:
                    thr = tl.load(thr_ptr + start + j)
                m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
                for off in range(0, V, BLOCK):
                    x = tl.div_rn(tl.load(base + off + offs, mask=off + offs < V, other=float("-inf")).to(tl.float32), t)
                    m_vec = tl.maximum(m_vec, tl.where(x >= thr, x, float("-inf")))
                m = tl.max(m_vec, 0)
                s_vec = tl.zeros([BLOCK], tl.float32)
                for off in range(0, V, BLOCK):
                    x = tl.div_rn(tl.load(base + off + offs, mask=off + offs < V, other=float("-inf")).to(tl.float32), t)
                    s_vec += tl.where(x >= thr, tl.exp(x - m), 0.0)
                s = tl.sum(s_vec, 0)
                if is_draft:
                    xd = tl.div_rn(tl.load(base + d).to(tl.float32), t)
                    p_d = tl.where(xd >= thr, tl.exp(xd - m) / s, 0.0)
                    q_d = 1.0
                    if HAS_Q:
                        q_d = tl.load(q_row + d).to(tl.float32)
                    if p_d >= _accept_uniform(pos, seed_hi, seed_lo) * q_d:
                        accepted = 1
                if accepted == 0:
                    # Gumbel-argmax of the residual (rejected draft) and of p (bonus, or a
                    # residual with no mass left), in the same pass.
                    best_r = tl.full([], float("-inf"), tl.float32)
                    idx_r = tl.full([], 0, tl.int32)
                    best_p = tl.full([], float("-inf"), tl.float32)
                    idx_p = tl.full([], 0, tl.int32)
                    for off in range(0, V, BLOCK):
                        tok = off + offs
                        valid = tok < V
                        x = tl.div_rn(tl.load(base + tok, mask=valid, other=float("-inf")).to(tl.float32), t)
                        kept = valid & (x >= thr)
                        g = gumbel_noise(tok, pos, seed_hi, seed_lo)
                        p = tl.where(kept, tl.exp(x - m) / s, 0.0)
                        if HAS_Q:
                            q = tl.load(q_row + tok, mask=valid, other=0.0).to(tl.float32)
                        else:
                            q = tl.where(is_draft & (tok == d), 1.0, 0.0)
                        r = tl.maximum(p - q, 0.0)
                        key_r = tl.where(is_draft & (r > 0), tl.log(tl.where(r > 0, r, 1.0)) + g, float("-inf"))
                        key_p = tl.where(kept, x + g, float("-inf"))
                        c_r = tl.max(key_r, 0)
                        a_r = tl.argmax(key_r, 0).to(tl.int32) + off
                        idx_r = tl.where(c_r > best_r, a_r, idx_r)
                        best_r = tl.maximum(best_r, c_r)
                        c_p = tl.max(key_p, 0)
                        a_p = tl.argmax(key_p, 0).to(tl.int32) + off
                        idx_p = tl.where(c_p > best_p, a_p, idx_p)
                        best_p = tl.maximum(best_p, c_p)
                    token = tl.where(best_r > float("-inf"), idx_r, idx_p)
            else:
                best = tl.full([], float("-inf"), tl.float32)
                idx = tl.full([], 0, tl.int32)
                for off in range(0, V, BLOCK):
                    x = tl.load(base + off + offs, mask=off + offs < V, other=float("-inf")).to(tl.float32)
                    c = tl.max(x, 0)
                    a = tl.argmax(x, 0).to(tl.int32) + off
                    idx = tl.where(c > best, a, idx)
                    best = tl.maximum(best, c)
                if is_draft & (idx == d):
                    accepted = 1
                token = idx
            tl.store(out_ptr + req.to(tl.int64) * stride_o + j, token.to(tl.int64))
            count = j + 1
            alive = accepted
    tl.store(nsamp_ptr + req, count)
    # -1 past the last emitted token: the output comes uninitialised (no fill launch).
    cols = tl.arange(0, BLOCK_COLS)
    tl.store(out_ptr + req.to(tl.int64) * stride_o + cols, tl.full([BLOCK_COLS], -1, tl.int64),
             mask=(cols >= count) & (cols < out_cols))


def rejection_sample_triton(target_logits: torch.Tensor, draft_ids: torch.Tensor, num_draft: torch.Tensor,
                            temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                            draft_probs: torch.Tensor | None, starts: torch.Tensor,
                            thresholds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    B, K = draft_ids.shape
    V = target_logits.shape[-1]
    dev = target_logits.device
    out = torch.empty((B, K + 1), dtype=torch.int64, device=dev)
    num_sampled = torch.empty(B, dtype=torch.int32, device=dev)
    if B == 0:
        return out, num_sampled
    drafts = draft_ids.contiguous() if K else torch.zeros(B, 1, dtype=torch.int64, device=dev)
    if K == 0:
        draft_probs = None
    q = draft_probs.contiguous() if draft_probs is not None else drafts   # dummy pointer when absent
    q_strides = (q.stride(0), q.stride(1)) if draft_probs is not None else (0, 0)
    thr = thresholds if thresholds is not None else out                    # dummy pointer when absent
    _rejection_kernel[(B,)](
        target_logits, target_logits.stride(0), starts.contiguous(), num_draft.contiguous(), drafts, drafts.stride(0),
        q, *q_strides, temperature.float().contiguous(), thr, seeds.contiguous(), positions.contiguous(),
        out, out.stride(0), K + 1, num_sampled, V,
        HAS_Q=draft_probs is not None, HAS_THR=thresholds is not None,
        BLOCK=min(4096, triton.next_power_of_2(V)), BLOCK_COLS=triton.next_power_of_2(K + 1), num_warps=4)
    return out, num_sampled
