"""From measured load to the expert map to migrate to, for a (possibly new) EP world.

Pure functions over CPU tensors. Maps here are [layers, group ranks * slots per rank]
over the current process group; a world smaller than the group (ranks about to
leave) leaves the last ranks' slots empty (-1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eplb.placement import Placement, balancedness
from eplb.policy import rebalance
from eplb.transfer_plan import preserve_slots


def target_placement(load: Tensor, num_ranks: int, slots_per_rank: int, current: Tensor,
                     num_groups: int = 1) -> Tensor:
    """phy2log for `num_ranks` ranks of `slots_per_rank` slots each, balanced for `load`
    [layers, logical experts], padded with -1 to the width of `current` and reordered
    so experts that stay on a rank keep their slot there (fewer bytes to move).

    Wide EP uses the global policy: with one node per GPU group hierarchical packing
    is weak (see benchmarks/RESULTS.md), and this engine's ranks are one node's worth.
    """
    width = current.shape[1]
    if width % slots_per_rank or num_ranks * slots_per_rank > width:
        raise ValueError(f"{num_ranks} ranks of {slots_per_rank} slots do not fit a map of {width} slots")
    placement = rebalance(load, num_ranks * slots_per_rank, num_groups, 1, num_ranks, hierarchical=False)
    rows = torch.full((load.shape[0], width), -1, dtype=torch.long)
    rows[:, :placement.num_slots] = placement.phy2log
    return torch.tensor([preserve_slots(old, new, slots_per_rank)
                         for old, new in zip(current.tolist(), rows.tolist())], dtype=torch.long)


def placement_balancedness(load: Tensor, phy2log: Tensor, num_ranks: int) -> Tensor:
    """Projected balancedness per layer of a map without empty slots (mean rank load /
    max rank load, each expert's load split evenly over its replicas)."""
    return balancedness(load, Placement.from_phy2log(phy2log, load.shape[1]), num_ranks)


def measured_balancedness(physical: Tensor, num_ranks: int) -> list[float]:
    """What the ranks actually carried: tokens per rank from per-slot counts
    [layers, slots]; 1.0 for a layer that saw no tokens."""
    per_rank = physical.double().view(physical.shape[0], num_ranks, -1).sum(-1)
    peak = per_rank.amax(1)
    ratio = per_rank.mean(1) / peak.clamp(min=1e-12)
    return torch.where(peak > 0, ratio, torch.ones_like(ratio)).tolist()


def rank_loads(physical: Tensor, num_ranks: int) -> list[float]:
    """Token-expert pairs each rank's slots served, per MoE layer on average, from per-slot
    counts [layers, slots] (the load per rank a dashboard draws)."""
    return physical.double().view(physical.shape[0], num_ranks, -1).sum(-1).mean(0).tolist()
