"""The fixed-size per-request state of a hybrid model (Mamba-2 layers), and how many
state slots an engine holds.

One slot holds every Mamba layer's conv window ([K-1, conv_dim], activation dtype)
and SSM state ([H, P, N], `mamba_ssm_cache_dtype`) in one run of bytes (conv windows
of every layer, then SSM states), so a request's state moves as one piece: one
transfer descriptor (disagg/). An engine has one slot per running request (max_num_seqs) plus a scratch
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

    def _parts(self, conv_dtype: torch.dtype) -> tuple[int, int]:
        """(bytes of the conv windows, offset of the SSM states) in one slot."""
        conv = self.num_layers * self.conv_shape[0] * self.conv_shape[1] * conv_dtype.itemsize
        return conv, -(-conv // _ALIGN) * _ALIGN

    def bytes_per_slot(self, conv_dtype: torch.dtype) -> int:
        ssm = self.num_layers * self.ssm_shape[0] * self.ssm_shape[1] * self.ssm_shape[2] * self.ssm_dtype.itemsize
        return -(-(self._parts(conv_dtype)[1] + ssm) // _ALIGN) * _ALIGN

    def allocate(self, num_slots: int, conv_dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One zeroed buffer [slots, bytes_per_slot] (uint8) and its two views: conv
        [slots, layers, K-1, conv_dim] and SSM [slots, layers, H, P, N]."""
        buf = torch.zeros(num_slots, self.bytes_per_slot(conv_dtype), dtype=torch.uint8, device=device)
        conv_bytes, ssm_off = self._parts(conv_dtype)
        conv = buf[:, :conv_bytes].view(conv_dtype).view(num_slots, self.num_layers, *self.conv_shape)
        ssm_bytes = self.num_layers * self.ssm_shape[0] * self.ssm_shape[1] * self.ssm_shape[2] * self.ssm_dtype.itemsize
        ssm = buf[:, ssm_off:ssm_off + ssm_bytes].view(self.ssm_dtype).view(num_slots, self.num_layers,
                                                                              *self.ssm_shape)
        return buf, conv, ssm

    def describe(self, conv_dtype: torch.dtype) -> dict:
        """What two engines must agree on to copy each other's slots (disagg's layout check)."""
        return {"layers": self.num_layers, "conv_shape": list(self.conv_shape),
                "conv_dtype": str(conv_dtype).removeprefix("torch."), "ssm_shape": list(self.ssm_shape),
                "ssm_dtype": str(self.ssm_dtype).removeprefix("torch."),
                "bytes_per_slot": self.bytes_per_slot(conv_dtype)}


_ALIGN = 64     # the SSM part and each slot start on this byte boundary


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
