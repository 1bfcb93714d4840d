"""The fixed-size per-request state of a hybrid model (Mamba-2 layers), and how many
state slots an engine holds.

One slot holds every Mamba layer's conv window ([K-1, conv_dim], activation dtype)
and SSM state ([H, P, N], `mamba_ssm_cache_dtype`), so a request's state moves as
one piece. An engine has one slot per running request (max_num_seqs) plus a scratch
slot that padded CUDA-graph entries write into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.kv_cache.groups import StateSlotSpec


@dataclass(frozen=True)
class StateLayout:
    num_layers: int
    conv_shape: tuple[int, int]          # (K - 1, conv_dim)
    ssm_shape: tuple[int, int, int]      # (heads, head_dim, d_state)
    ssm_dtype: torch.dtype

    def bytes_per_slot(self, conv_dtype: torch.dtype) -> int:
        size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
        conv = self.conv_shape[0] * self.conv_shape[1] * size(conv_dtype)
        ssm = self.ssm_shape[0] * self.ssm_shape[1] * self.ssm_shape[2] * size(self.ssm_dtype)
        return self.num_layers * (conv + ssm)


class StateSlots(NamedTuple):
    """The state-slot cache group's spec and slot count (KVCacheManager's arguments)."""
    spec: StateSlotSpec
    num_slots: int

    @property
    def total_bytes(self) -> int:
        return self.spec.bytes_per_slot * (self.num_slots + 1)      # + the scratch slot


def state_layout_of(model) -> StateLayout | None:
    """The model's per-request state, or None for models without one."""
    fn = getattr(model, "state_layout", None)
    return fn() if fn is not None else None


def state_slots_for(model, max_num_seqs: int, dtype: torch.dtype) -> StateSlots | None:
    layout = state_layout_of(model)
    if layout is None:
        return None
    return StateSlots(StateSlotSpec(layout.bytes_per_slot(dtype)), max_num_seqs)
