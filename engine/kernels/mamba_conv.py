"""Triton causal depthwise conv1d (+ SiLU) over packed requests, with each request's
rolling window of the last K-1 inputs kept in its state slot.

One program per (request, channel block) walks the request's tokens in tiles. Window
positions before the request's first new token read the slot's saved inputs (or zeros
for a request without state). The slot's new window (the last K-1 inputs of saved +
new) is read into registers first and stored after a barrier, once every thread of
the program has read the old one. Decode is the same kernel with one token per
request (no query_start_loc, always from state). Nothing is read back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_kernel(x_ptr, sx_t, w_ptr, b_ptr, st_ptr, ss_s, ss_k, out_ptr, so_t, qsl_ptr, slots_ptr, init_ptr, C,
                 K: tl.constexpr, KB: tl.constexpr, HAS_BIAS: tl.constexpr, DECODE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if DECODE:
        start = r.to(tl.int64)
        n = 1
        lo = -(K - 1)
    else:
        start = tl.load(qsl_ptr + r).to(tl.int64)
        n = (tl.load(qsl_ptr + r + 1) - start).to(tl.int32)
        # Window positions >= lo exist: saved inputs (negative positions) only with a state.
        lo = tl.where(tl.load(init_ptr + r) != 0, -(K - 1), 0)
    st = st_ptr + tl.load(slots_ptr + r).to(tl.int64) * ss_s
    # The slot's next window, from the old window and the new tokens.
    j = tl.arange(0, KB)
    pos = n - (K - 1) + j
    jm = j < K - 1
    nx = tl.load(x_ptr + (start + pos)[:, None] * sx_t + c[None, :],
                 mask=(jm & (pos >= 0))[:, None] & cm[None, :], other=0.0)
    ns = tl.load(st + (K - 1 + pos)[:, None] * ss_k + c[None, :],
                 mask=(jm & (pos < 0) & (pos >= lo))[:, None] & cm[None, :], other=0.0)
    new_window = nx.to(tl.float32) + ns.to(tl.float32)
    bias = tl.zeros([BLOCK_C], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    for t0 in range(0, n, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < n
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            p = t - (K - 1) + k
            xv = tl.load(x_ptr + (start + p)[:, None] * sx_t + c[None, :],
                         mask=(tm & (p >= 0))[:, None] & cm[None, :], other=0.0)
            sv = tl.load(st + (K - 1 + p)[:, None] * ss_k + c[None, :],
                         mask=(tm & (p < 0) & (p >= lo))[:, None] & cm[None, :], other=0.0)
            w = tl.load(w_ptr + c * K + k, mask=cm, other=0.0).to(tl.float32)
            acc += (xv.to(tl.float32) + sv.to(tl.float32)) * w[None, :]
        y = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + (start + t)[:, None] * so_t + c[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=tm[:, None] & cm[None, :])
    tl.debug_barrier()      # every thread has read the old window
    tl.store(st + j[:, None] * ss_k + c[None, :], new_window.to(st_ptr.dtype.element_ty),
             mask=jm[:, None] & cm[None, :])


def _launch(x, weight, bias, conv_state, qsl, slots, init, decode: bool, num_reqs: int) -> torch.Tensor:
    C = x.shape[1]
    K = weight.shape[-1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.reshape(C, K).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_reqs == 0 or C == 0:
        return out
    block_c = min(256, triton.next_power_of_2(C))
    _conv_kernel[(num_reqs, triton.cdiv(C, block_c))](
        x, x.stride(0), weight, bias if bias is not None else weight, conv_state, conv_state.stride(0),
        conv_state.stride(1), out, out.stride(0), qsl, slots, init, C, K=K,
        KB=triton.next_power_of_2(max(K - 1, 1)), HAS_BIAS=bias is not None, DECODE=decode,
        BLOCK_T=1 if decode else 16, BLOCK_C=block_c, num_warps=4)
    return out


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                         query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                         has_initial_state: torch.Tensor) -> torch.Tensor:
    init = has_initial_state.view(torch.uint8)
    return _launch(x, weight, bias, conv_state, query_start_loc, state_slots, init, False, state_slots.shape[0])


def causal_conv1d_update_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                conv_state: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    return _launch(x, weight, bias, conv_state, state_slots, state_slots, state_slots, True, x.shape[0])
