"""Expert-load statistics on a rank: a sliding window of per-step token counts.

Every MoE layer counts the tokens it routes to each physical slot in its
`expert_load` buffer. Here those buffers become rows of one [layers, slots] tensor, so
one copy and one zero per step move a step's counts into the window, on the device and
without a host sync. The window is kept per *logical* expert (the step's counts are
folded through the layer's current map before they are stored), so a map swap in the
middle of a window does not scramble it. Physical counts since the last collection
are kept too: they measure the balance the current placement actually achieves.

Ranks aggregate (all-reduce) only at steps the coordinator marks, so every rank enters
the collective at the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ExpertLoadWindow:
    def __init__(self, layers: list[nn.Module], window_size: int) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if not layers:
            raise ValueError("no MoE layers to count")
        self.layers = layers
        self.window_size = window_size
        self.rebind()

    def rebind(self) -> None:
        """(Re)build the buffers for the layers' current slot count and maps; call after
        a regroup or a map swap (a swap keeps the window, a slot-count change resets it)."""
        device = self.layers[0].expert_load.device
        num_physical = self.layers[0].num_physical
        num_logical = self.layers[0].num_experts
        shape = (len(self.layers), num_physical)
        if getattr(self, "current", None) is None or self.current.shape != shape:
            self.current = torch.zeros(shape, dtype=torch.long, device=device)
            self.physical = torch.zeros(shape, dtype=torch.long, device=device)
            self.window = torch.zeros(self.window_size, len(self.layers), num_logical, dtype=torch.long,
                                      device=device)
            self.steps = 0
        for i, moe in enumerate(self.layers):
            moe.expert_load = self.current[i]       # the layer counts straight into our row
        phy2log = torch.stack([moe.phy2log.to(device) for moe in self.layers])
        self._fold = phy2log.clamp(min=0)           # empty slots (-1) are never routed to

    def record(self) -> None:
        """After each step: fold the step's counts into the window, then zero them."""
        logical = torch.zeros_like(self.window[0]).scatter_add_(1, self._fold, self.current)
        self.window[self.steps % self.window_size].copy_(logical)
        self.physical += self.current
        self.current.zero_()
        self.steps += 1

    def collect(self, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce over the EP group: (logical load summed over the window [layers,
        experts], physical counts since the last collection [layers, slots]). Every
        rank must call this at the same step. Resets the physical counts."""
        flat = torch.cat([self.window.sum(0).flatten(), self.physical.flatten()])
        if dist.is_initialized():
            dist.all_reduce(flat, group=group)
        n = self.window.shape[1] * self.window.shape[2]
        logical = flat[:n].view(self.window.shape[1:])
        physical = flat[n:].view(self.physical.shape)
        self.physical.zero_()
        return logical, physical
