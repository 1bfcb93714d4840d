"""Mamba-2 operations: torch references (the oracle in tests) and their dispatchers.

Tokens of all requests are packed along one axis, as for attention: request i owns
rows query_start_loc[i]:query_start_loc[i+1]. Each request's recurrent state lives in
a fixed-size slot of the engine's state cache (`state_slots[i]`):
- conv_state [slots, K-1, C]: the last K-1 raw conv inputs, oldest first;
- ssm_state [slots, H, P, N]: the SSM state, in the cache's dtype (float32 by default).
Both may be views with arbitrary slot strides (one slot holds every layer's state).
A request whose `has_initial_state` is false starts from zeros whatever its slot holds
(a new or preempted request), so slots never need clearing.

Every op computes in float32 and rounds outputs to the activation dtype. dt is not
clamped (dt_limit (0, inf)), as in vLLM; transformers clamps dt >= time_step_min in its
prefill path only (reference/models.md), so the two agree whenever dt stays above it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import dtype_problem, unsupported, use_triton


def _up(t: torch.Tensor) -> torch.Tensor:
    """float32 compute (float64 inputs stay float64: the tests' exact oracle)."""
    return t if t.dtype == torch.float64 else t.float()


# -- causal depthwise conv1d (+ SiLU) ------------------------------------------------
def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                      query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                      has_initial_state: torch.Tensor) -> torch.Tensor:
    """x [T, C]; weight [C, K] -> silu(conv(x)) [T, C]. Each request's window starts
    from its slot's last K-1 inputs; afterwards the slot holds the request's last K-1."""
    K = weight.shape[1]
    out = torch.empty_like(x)
    qsl, slots, init = query_start_loc.tolist(), state_slots.tolist(), has_initial_state.tolist()
    w = _up(weight)
    for i, slot in enumerate(slots):
        s, e = qsl[i], qsl[i + 1]
        if e == s:
            continue
        prev = _up(conv_state[slot]) if init[i] else x.new_zeros(K - 1, x.shape[1], dtype=w.dtype)
        seq = torch.cat([prev, _up(x[s:e])])                   # [K-1+n, C]
        y = (seq.unfold(0, K, 1) * w).sum(-1)                     # windows [n, C, K]
        if bias is not None:
            y = y + _up(bias)
        out[s:e] = F.silu(y).to(x.dtype)
        conv_state[slot] = seq[seq.shape[0] - (K - 1):].to(conv_state.dtype)
    return out


def causal_conv1d_update_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             conv_state: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """One new token per request: x [B, C] -> silu(conv) [B, C]; the slot's window shifts by one."""
    slots = state_slots.long()
    win = torch.cat([_up(conv_state[slots]), _up(x)[:, None]], 1)     # [B, K, C]
    y = (win * _up(weight).t()).sum(1)
    if bias is not None:
        y = y + _up(bias)
    conv_state[slots] = win[:, 1:].to(conv_state.dtype)
    return F.silu(y).to(x.dtype)


# -- SSD scan (prefill) and the single-step state update (decode) ----------------------
def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, N] per group -> [..., H, N] per head (head h reads group h // (H // G))."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def ssd_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, dt_bias: torch.Tensor, ssm_state: torch.Tensor, query_start_loc: torch.Tensor,
                 state_slots: torch.Tensor, has_initial_state: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """x [T, H, P]; dt [T, H] (before bias and softplus); A [H] (negative); B, C [T, G, N];
    D, dt_bias [H] -> y [T, H, P]. The chunked SSD form: inside a chunk the masked
    quadratic form, between chunks the state; each request's final state goes to its slot."""
    H = x.shape[1]
    y = torch.empty_like(x)
    qsl, slots, init = query_start_loc.tolist(), state_slots.tolist(), has_initial_state.tolist()
    acc = _up(x[:0]).dtype
    Af = A.to(acc)
    for i, slot in enumerate(slots):
        s, e = qsl[i], qsl[i + 1]
        if e == s:
            continue
        dts = F.softplus(_up(dt[s:e]) + _up(dt_bias))                     # [n, H]
        xs, Bs, Cs = _up(x[s:e]), _heads(_up(B[s:e]), H), _heads(_up(C[s:e]), H)
        state = ssm_state[slot].to(acc) if init[i] else x.new_zeros(ssm_state.shape[1:], dtype=acc)
        for c in range(0, e - s, chunk_size):
            sl = slice(c, c + chunk_size)
            d, xc, Bc, Cc = dts[sl], xs[sl], Bs[sl], Cs[sl]
            cs = torch.cumsum(d * Af, 0)                                       # [q, H], non-increasing
            q = d.shape[0]
            causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
            seg = (cs[:, None] - cs[None]).masked_fill(~causal[..., None], float("-inf"))   # [i, j, H]
            scores = torch.einsum("ihn,jhn->ijh", Cc, Bc) * seg.exp() * d[None]
            yc = torch.einsum("ijh,jhp->ihp", scores, xc)
            yc += cs.exp()[..., None] * torch.einsum("ihn,hpn->ihp", Cc, state)   # from the chunk's start state
            y[s + c:s + c + q] = (yc + _up(D)[:, None] * xc).to(x.dtype)
            to_end = (cs[-1:] - cs).exp() * d                                  # [q, H]
            state = cs[-1].exp()[:, None, None] * state + torch.einsum("jh,jhp,jhn->hpn", to_end, xc, Bc)
        ssm_state[slot] = state.to(ssm_state.dtype)
    return y


def selective_state_update_ref(ssm_state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                               state_slots: torch.Tensor) -> torch.Tensor:
    """One token per request: x [B, H, P]; dt [B, H]; B, C [B, G, N] -> y [B, H, P];
    S <- exp(dt A) S + dt x B^T in the request's slot, y = S C + D x."""
    H = x.shape[1]
    slots = state_slots.long()
    d = F.softplus(_up(dt) + _up(dt_bias))                                # [B, H]
    xf = _up(x)
    state = _up(ssm_state[slots]) * (d * _up(A)).exp()[..., None, None]
    state = state + (d[..., None] * xf)[..., None] * _heads(_up(B), H)[:, :, None, :]
    ssm_state[slots] = state.to(ssm_state.dtype)
    y = (state * _heads(_up(C), H)[:, :, None, :]).sum(-1) + _up(D)[:, None] * xf
    return y.to(x.dtype)


# -- gated RMSNorm (norm after gate, per group) ---------------------------------------
def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                       eps: float) -> torch.Tensor:
    """weight * rmsnorm_per_group(y * silu(z)), normalised in float32 and rounded to
    the activation dtype before the weight multiplies (as transformers' NemotronH does)."""
    h = _up(y) * F.silu(_up(z))
    g = h.view(*h.shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.view(h.shape).to(y.dtype)


# -- dispatchers ----------------------------------------------------------------------
def _state_problem(*states: torch.Tensor) -> str | None:
    for s in states:
        if s.stride(-1) != 1:
            return "a state cache whose rows are not contiguous"
    return None


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                  query_start_loc: torch.Tensor, state_slots: torch.Tensor, has_initial_state: torch.Tensor,
                  backend: str | None = None) -> torch.Tensor:
    if use_triton(x, backend) and not unsupported(
            "causal_conv1d", dtype_problem(x, conv_state) or _state_problem(conv_state)):
        from engine.kernels.mamba_conv import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, conv_state, query_start_loc, state_slots, has_initial_state)
    return causal_conv1d_ref(x, weight, bias, conv_state, query_start_loc, state_slots, has_initial_state)


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_state: torch.Tensor, state_slots: torch.Tensor,
                         backend: str | None = None) -> torch.Tensor:
    if use_triton(x, backend) and not unsupported(
            "causal_conv1d_update", dtype_problem(x, conv_state) or _state_problem(conv_state)):
        from engine.kernels.mamba_conv import causal_conv1d_update_triton
        return causal_conv1d_update_triton(x, weight, bias, conv_state, state_slots)
    return causal_conv1d_update_ref(x, weight, bias, conv_state, state_slots)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, dt_bias: torch.Tensor, ssm_state: torch.Tensor, query_start_loc: torch.Tensor,
             state_slots: torch.Tensor, has_initial_state: torch.Tensor, chunk_size: int,
             backend: str | None = None) -> torch.Tensor:
    if use_triton(x, backend) and not unsupported(
            "ssd_scan", dtype_problem(x, B, C, ssm_state) or _state_problem(ssm_state)):
        # The kernel's chunk is its own tile size: chunking changes only rounding.
        from engine.kernels.mamba_scan import ssd_scan_triton
        return ssd_scan_triton(x, dt, A, B, C, D, dt_bias, ssm_state, query_start_loc, state_slots,
                               has_initial_state)
    return ssd_scan_ref(x, dt, A, B, C, D, dt_bias, ssm_state, query_start_loc, state_slots,
                        has_initial_state, chunk_size)


def selective_state_update(ssm_state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                           state_slots: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    if use_triton(x, backend) and not unsupported(
            "selective_state_update", dtype_problem(x, B, C, ssm_state) or _state_problem(ssm_state)):
        from engine.kernels.mamba_scan import selective_state_update_triton
        return selective_state_update_triton(ssm_state, x, dt, A, B, C, D, dt_bias, state_slots)
    return selective_state_update_ref(ssm_state, x, dt, A, B, C, D, dt_bias, state_slots)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                   backend: str | None = None) -> torch.Tensor:
    if use_triton(y, backend) and not unsupported(
            "gated_rms_norm", dtype_problem(y, z) or (None if weight.dtype == y.dtype else "a weight dtype "
                                                      "other than the activations'")):
        from engine.kernels.mamba_norm import gated_rms_norm_triton
        return gated_rms_norm_triton(y, z, weight, group_size, eps)
    return gated_rms_norm_ref(y, z, weight, group_size, eps)
