"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules.

Two pair layouts: "neox" rotates (x[i], x[i + d/2]); "interleaved" (DeepSeek) rotates
(x[2i], x[2i+1]) and returns the result de-interleaved ([rotated evens | rotated odds]).
Attention scores only depend on q.k, so any layout applied to both q and k is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.ops.attention import KVWrite
from engine.ops.rotary import rotary


def rope_parameters(config) -> dict:
    """The rope settings of a Hugging Face config, old (`rope_scaling`) or new style."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = kind
    return params


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], cos/sin scaling) for a rope schedule."""
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    factor = float(params["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old_len = params["original_max_position_embeddings"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, base, factor, params, max_position)
    raise ValueError(f"unsupported rope type {kind!r} (supported: default, linear, llama3, yarn)")


def _yarn(dim: int, base: float, factor: float, p: dict, max_position: int) -> tuple[torch.Tensor, float]:
    orig = p.get("original_max_position_embeddings") or max_position
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    scaling = p.get("attention_factor")
    if scaling is None:
        scaling = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                   if mscale and mscale_all else yarn_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(scaling)


# cos/sin tables shared by every layer with the same schedule (one per model, not per
# layer): key -> (cos, sin), each [positions, dim/2] float32 with the scaling folded in.
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, params: dict, max_position: int, interleaved: bool = False) -> None:
        super().__init__()
        inv, self.scaling = inv_frequencies(dim, params, max_position)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved
        self.max_position = max_position
        self._key = (tuple(inv.tolist()), self.scaling)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def reserve(self, num_positions: int) -> None:
        """Make the cos/sin table cover positions [0, num_positions)."""
        n = max(num_positions, self.max_position)
        if self._table is not None and self._table[0].shape[0] >= n and self._table[0].device == self.inv_freq.device:
            return
        key = (*self._key, self.inv_freq.device)
        table = _TABLES.get(key)
        if table is None or table[0].shape[0] < n:
            # Same float32 arithmetic as computing from the positions each step.
            freqs = torch.arange(n, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
            table = _TABLES[key] = (freqs.cos() * self.scaling, freqs.sin() * self.scaling)
        self._table = table

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                write: KVWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, dim] and k [T, Hk, dim] by their token's position; with
        q_norm/k_norm (RMSNorm modules), normalise each head first; with `write`, store
        the rotated k and write.v in the paged cache (all one fused launch)."""
        if self._table is None or self._table[0].device != self.inv_freq.device:
            self.reserve(self.max_position)
        cos, sin = self._table
        if q_norm is None:
            return rotary(positions, q, k, cos, sin, self.interleaved, write=write)
        return rotary(positions, q, k, cos, sin, self.interleaved, q_norm.weight, k_norm.weight, q_norm.eps, write)
