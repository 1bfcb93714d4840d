"""Parameters that know how to load checkpoint tensors into themselves.

Fused parameters (q|k|v, gate|up, every expert's gate|up) load shard by shard; each
parameter keeps a `loader(param, tensor, shard)` that puts one checkpoint tensor in
its place and returns how many elements it wrote, so the model loader can prove every
element was written exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from engine.ops.norm_linear import decode_fused, norm_linear

Loader = Callable[[torch.Tensor, torch.Tensor, object], int]


def _check(name: str, want: Sequence[int], got: torch.Tensor) -> None:
    if tuple(want) != tuple(got.shape):
        raise ValueError(f"expected shape {tuple(want)} for {name}, checkpoint has {tuple(got.shape)}")


def whole_loader(param: torch.Tensor, w: torch.Tensor, shard: object) -> int:
    _check("the whole parameter", param.shape, w)
    param.copy_(w)
    return w.numel()


def row_shards_loader(sizes: Sequence[int]) -> Loader:
    """Shard i fills rows sum(sizes[:i]) : sum(sizes[:i+1]) of a fused weight."""
    def load(param: torch.Tensor, w: torch.Tensor, shard: object) -> int:
        assert isinstance(shard, int)
        start = sum(sizes[:shard])
        dst = param[start:start + sizes[shard]]
        _check(f"shard {shard}", dst.shape, w)
        dst.copy_(w)
        return w.numel()
    return load


def param(*shape: int, loader: Loader = whole_loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.loader = loader
    return p


class Linear(nn.Module):
    """y = x W^T (+ b); W is [out, in] as in checkpoints. At decode sizes a GEMV-shaped
    Triton kernel (engine/ops/norm_linear.py) instead of the matmul library's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shards: Sequence[int] | None = None) -> None:
        super().__init__()
        loader = row_shards_loader(shards) if shards else whole_loader
        self.weight = param(out_features, in_features, loader=loader)
        self.bias = param(out_features, loader=loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_fused(x):
            return norm_linear(x, self.weight, self.bias)[0]
        return nn.functional.linear(x, self.weight, self.bias)

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight converted to dtype and kept (a float32 router: no conversion launch
        per step); converted again when the weight changes (loading, moving)."""
        w = self.weight
        if w.dtype == dtype:
            return w
        key = (dtype, w.device, w.data_ptr(), w._version)
        if getattr(self, "_converted", (None,))[0] != key:
            self._converted = (key, w.detach().to(dtype))
        return self._converted[1]
