"""Mamba-2 mixer (NemotronH's `M` layers) over per-request state slots.

in_proj -> [z | xBC | dt]; causal conv1d + SiLU over xBC; SSD over (x, B, C) with
dt = softplus(dt + dt_bias) and A = -exp(A_log); gated RMSNorm of y with z
(norm after gate, per group); out_proj. Each request's conv window and SSM state live
in its slot of the runner's state cache (`conv_state`, `ssm_state`, bound by the
runner); a step either continues every request by one token (decode: the single-step
updates, in place, CUDA-graph safe) or runs the chunked prefill forms, which start
from the slot when the request has computed tokens before this step. A speculative
verification step (`HybridMetadata.verify`) runs drafting requests token by token and
keeps every token's state for the rollback (engine/layers/mamba_spec.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.params import Linear, param
from engine.ops.attention import AttentionMetadata
from engine.layers.mamba_spec import VerifySteps, conv_steps, ssm_steps
from engine.ops.mamba import causal_conv1d, causal_conv1d_update, gated_rms_norm, selective_state_update, ssd_scan


@dataclass
class HybridMetadata(AttentionMetadata):
    """Attention metadata plus what Mamba layers need: each request's state slot and
    whether it continues from it (it had computed tokens before this step)."""
    state_slots: torch.Tensor | None = None         # [num_reqs] int32, device
    has_initial_state: torch.Tensor | None = None   # [num_reqs] bool, device
    verify: VerifySteps | None = None               # a speculative verification step (mamba_spec.py)


@dataclass(frozen=True)
class MambaShape:
    hidden: int
    num_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    conv_kernel: int
    chunk_size: int = 128
    eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


class Mamba2Mixer(nn.Module):
    def __init__(self, s: MambaShape) -> None:
        super().__init__()
        self.s = s
        self.in_proj = Linear(s.hidden, s.d_inner + s.conv_dim + s.num_heads, bias=s.proj_bias)
        self.conv1d = nn.Module()
        self.conv1d.weight = param(s.conv_dim, 1, s.conv_kernel)     # checkpoint shape [C, 1, K]
        self.conv1d.bias = param(s.conv_dim) if s.conv_bias else None
        self.dt_bias = param(s.num_heads)
        self.A_log = param(s.num_heads)
        self.D = param(s.num_heads)
        self.norm = nn.Module()
        self.norm.weight = param(s.d_inner)
        self.out_proj = Linear(s.d_inner, s.hidden, bias=s.proj_bias)
        self.conv_state: torch.Tensor | None = None    # [slots, K-1, conv_dim]
        self.ssm_state: torch.Tensor | None = None     # [slots, H, P, N]

    def forward(self, x: torch.Tensor, meta: HybridMetadata) -> torch.Tensor:
        s = self.s
        T = x.shape[0]
        H, P, G, N = s.num_heads, s.head_dim, s.n_groups, s.d_state
        z, xbc, dt = self.in_proj(x).split([s.d_inner, s.conv_dim, H], -1)
        A = -torch.exp(self.A_log.float())
        w = self.conv1d.weight.view(s.conv_dim, s.conv_kernel)
        slots = meta.state_slots
        if meta.verify is not None:
            return self._forward_verify(xbc, z, dt, A, w, meta)
        # Every request one token (graph-padded entries too: they point at a scratch slot).
        decode = meta.max_query_len <= 1 and T == meta.num_reqs
        if decode:
            xbc = causal_conv1d_update(xbc, w, self.conv1d.bias, self.conv_state, slots)
        else:
            xbc = causal_conv1d(xbc, w, self.conv1d.bias, self.conv_state, meta.query_start_loc, slots,
                                meta.has_initial_state)
        xs, B, C = xbc.split([s.d_inner, G * N, G * N], -1)
        xs, B, C = xs.view(T, H, P), B.view(T, G, N), C.view(T, G, N)
        if decode:
            y = selective_state_update(self.ssm_state, xs, dt, A, B, C, self.D, self.dt_bias, slots)
        else:
            y = ssd_scan(xs, dt, A, B, C, self.D, self.dt_bias, self.ssm_state, meta.query_start_loc, slots,
                         meta.has_initial_state, s.chunk_size)
        y = gated_rms_norm(y.view(T, s.d_inner), z, self.norm.weight, s.d_inner // G, s.eps)
        return self.out_proj(y)

    def _forward_verify(self, xbc: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                        w: torch.Tensor, meta: HybridMetadata) -> torch.Tensor:
        """A verification step: requests with drafts token by token, keeping the state
        after each token in `meta.verify.history`; the others on the chunked path."""
        s, v = self.s, meta.verify
        T = xbc.shape[0]
        H, P, G, N = s.num_heads, s.head_dim, s.n_groups, s.d_state
        conv = xbc.new_empty(T + 1, s.conv_dim)       # row T: where rows without drafts write
        if v.chunked:
            conv[:T] = causal_conv1d(xbc, w, self.conv1d.bias, self.conv_state, meta.query_start_loc,
                                     v.chunked_slots, v.chunked_init)
        conv_hist = conv_steps(v, xbc, w, self.conv1d.bias, self.conv_state, meta.state_slots, conv)
        xs, B, C = conv[:T].split([s.d_inner, G * N, G * N], -1)
        xs, B, C = xs.reshape(T, H, P), B.reshape(T, G, N), C.reshape(T, G, N)
        y = xs.new_empty(T + 1, H, P)
        if v.chunked:
            y[:T] = ssd_scan(xs, dt, A, B, C, self.D, self.dt_bias, self.ssm_state, meta.query_start_loc,
                             v.chunked_slots, v.chunked_init, s.chunk_size)
        ssm_hist = ssm_steps(v, xs, dt, A, B, C, self.D, self.dt_bias, self.ssm_state, meta.state_slots, y)
        v.history.append((conv_hist, ssm_hist))
        y = gated_rms_norm(y[:T].reshape(T, s.d_inner), z, self.norm.weight, s.d_inner // G, s.eps)
        return self.out_proj(y)
