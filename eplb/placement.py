"""Expert placements: the maps one rebalance produces, and how to score them.

A placement assigns every physical expert slot of every MoE layer a logical expert.
Slot ``s`` lives on GPU ``s // (num_replicas // num_gpus)``, so the GPU of a slot is
implicit and every GPU holds the same number of slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Placement:
    """Expert maps for all MoE layers (int64, on the CPU).

    phy2log: [layers, num_replicas], logical expert held by each physical slot.
    log2phy: [layers, num_logical, max_copies], physical slots of each logical expert
        in increasing slot order, padded with -1; max_copies is the largest replica
        count in this placement (an engine with fixed-width maps pads further).
    logcnt: [layers, num_logical], number of replicas of each logical expert.
    """

    phy2log: Tensor
    log2phy: Tensor
    logcnt: Tensor

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_replicas(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logcnt.shape[1]

    @classmethod
    def from_phy2log(cls, phy2log: Tensor, num_logical: int) -> Placement:
        """Derive log2phy and logcnt from phy2log, so the three maps cannot disagree."""
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be 2-D [layers, replicas], got shape {tuple(phy2log.shape)}")
        phy2log = phy2log.to(device="cpu", dtype=torch.int64).contiguous()
        layers, replicas = phy2log.shape
        if replicas and (phy2log.min() < 0 or phy2log.max() >= num_logical):
            raise ValueError(f"phy2log holds ids outside [0, {num_logical})")
        logcnt = torch.zeros(layers, num_logical, dtype=torch.int64)
        logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
        # A stable sort groups each expert's slots together in slot order; a slot's
        # position inside its group is its replica index.
        sorted_log, slots = phy2log.sort(dim=1, stable=True)
        starts = logcnt.cumsum(1) - logcnt
        replica = torch.arange(replicas).expand(layers, -1) - starts.gather(1, sorted_log)
        width = max(int(logcnt.max()), 1) if logcnt.numel() else 1
        log2phy = torch.full((layers, num_logical, width), -1, dtype=torch.int64)
        rows = torch.arange(layers).unsqueeze(1).expand(-1, replicas)
        log2phy[rows, sorted_log, replica] = slots
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)


def gpu_loads(load: Tensor, placement: Placement, num_gpus: int) -> Tensor:
    """Load per GPU [layers, num_gpus], each expert's load split evenly over its copies.

    Even splitting is what a load-oblivious replica choice (hash of the token index
    modulo the replica count) gives on average.
    """
    if load.shape != placement.logcnt.shape:
        raise ValueError(
            f"load has shape {tuple(load.shape)} but the placement is for "
            f"{tuple(placement.logcnt.shape)} [layers, logical experts]"
        )
    if num_gpus <= 0 or placement.num_replicas % num_gpus:
        raise ValueError(f"{placement.num_replicas} slots do not split evenly over {num_gpus} GPUs")
    load = load.detach().to(device="cpu", dtype=torch.float64)
    per_copy = load / placement.logcnt.clamp(min=1)
    per_slot = per_copy.gather(1, placement.phy2log)
    return per_slot.view(placement.num_layers, num_gpus, -1).sum(-1)


def balancedness(load: Tensor, placement: Placement, num_gpus: int) -> Tensor:
    """Mean GPU load / max GPU load per layer [layers] (1.0 is perfect balance).

    A layer without load counts as perfectly balanced: there is nothing to even out.
    """
    per_gpu = gpu_loads(load, placement, num_gpus)
    peak = per_gpu.amax(1)
    ratio = per_gpu.mean(1) / peak.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(peak > 0, ratio, torch.ones_like(ratio))


def contiguous_placement(num_layers: int, num_logical: int, num_gpus: int) -> Placement:
    """Baseline without EPLB: GPU g holds experts [g*k, (g+1)*k), one copy each.

    Load-oblivious and without replicas: the layout an engine starts with, and the
    reference a rebalanced placement is compared with.
    """
    if num_layers <= 0 or num_logical <= 0 or num_gpus <= 0:
        raise ValueError("num_layers, num_logical and num_gpus must be positive")
    if num_logical % num_gpus:
        raise ValueError(
            f"{num_logical} experts do not split evenly over {num_gpus} GPUs; "
            "without replicas each GPU must hold the same number of experts"
        )
    phy2log = torch.arange(num_logical, dtype=torch.int64).repeat(num_layers, 1)
    return Placement.from_phy2log(phy2log, num_logical)
