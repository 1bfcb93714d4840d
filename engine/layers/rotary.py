"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules.

Two pair layouts: "neox" rotates (x[i], x[i + d/2]); "interleaved" (DeepSeek) rotates
(x[2i], x[2i+1]) and returns the result de-interleaved ([rotated evens | rotated odds]).
Attention scores only depend on q.k, so any layout applied to both q and k is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, params: dict, max_position: int, interleaved: bool = False) -> None:
        super().__init__()
        inv, self.scaling = inv_frequencies(dim, params, max_position)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x [T, heads, dim] by its token's position."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos = (freqs.cos() * self.scaling)[:, None, :]
        sin = (freqs.sin() * self.scaling)[:, None, :]
        return tuple(self._rotate(x, cos.to(x.dtype), sin.to(x.dtype)) for x in xs)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
