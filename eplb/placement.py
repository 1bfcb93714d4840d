"""Expert placements: the maps one rebalance produces, and how to score them.

A placement assigns every physical expert slot of every MoE layer a logical expert.
Slot ``s`` lives on GPU ``s // (num_slots // num_gpus)``, so the GPU of a slot is
implicit and every GPU holds the same number of slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.layers.expert_map import ExpertMap

# A placement is the engine's expert map (phy2log / log2phy / logcnt, derived once
# there); the policy's maps have no empty slots.
Placement = ExpertMap


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
    if bool((placement.phy2log < 0).any()):
        raise ValueError("the placement has empty slots (-1); score only complete placements")
    if num_gpus <= 0 or placement.num_slots % num_gpus:
        raise ValueError(f"{placement.num_slots} slots do not split evenly over {num_gpus} GPUs")
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
