"""Expert-placement policy of the EPLB rebalancer: pure functions over CPU tensors.

Given the recent load of every logical expert, choose how many replicas each expert
gets and which GPU holds each replica, so that the most loaded GPU carries as little
as possible. Every GPU holds the same number of slots (the engine allocates expert
weights per slot). All steps are vectorised over layers (and nodes): the only Python
loops run over the items being packed and over improving swaps, never over layers.

Hierarchical (DeepSeek-style, when expert groups divide evenly over nodes):
  1. pack expert groups onto nodes, same number of groups per node, balanced load;
  2. inside each node, give the node's redundant slots to its hottest experts;
  3. pack the node's physical experts onto its GPUs.
  Each group stays on one node, which keeps group-limited routing mostly inside nodes.
Global: the same with one group and one node; balances better, ignores node locality.
"""

from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

from eplb.packing import balanced_packing
from eplb.placement import Placement


def replicate_experts(weight: Tensor, num_phy: int) -> tuple[Tensor, Tensor]:
    """Spread num_phy slots over the experts of each row, hottest experts first.

    weight: [rows, n] load per logical expert. Returns (phy2log [rows, num_phy],
    logcnt [rows, n]); slots 0..n-1 hold experts 0..n-1, redundant slots follow.

    Water-filling: each redundant slot goes to the expert with the highest load per
    copy. Those choices are exactly the `extra` largest values of {weight[i] / k :
    k >= 1}, so a threshold replaces a loop over slots. Only the `extra` heaviest
    experts can win a copy, and none wins more than `extra` copies.
    """
    rows, n = weight.shape
    extra = num_phy - n
    base = torch.arange(n, dtype=torch.int64).expand(rows, -1)
    if extra == 0:
        return base.clone(), torch.ones(rows, n, dtype=torch.int64)
    cands = min(extra, n)
    hot_w, hot = weight.sort(dim=1, descending=True, stable=True)
    hot_w, hot = hot_w[:, :cands], hot[:, :cands]
    k = torch.arange(1, extra + 1, dtype=weight.dtype)
    gain = (hot_w.unsqueeze(1) / k.view(1, -1, 1)).flatten(1)  # [rows, extra * cands]
    tau = gain.topk(extra, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = gain > tau
    tied = gain == tau
    # Among candidates tied at the threshold take the first ones in copy-major order,
    # so ties (e.g. no load at all) give every expert a second copy before any third.
    need = extra - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= need))
    copies = take.view(rows, extra, cands).sum(1)
    logcnt = torch.ones(rows, n, dtype=torch.int64).scatter_add_(1, hot, copies)
    # Redundant slots list the winners hottest first, an expert's copies side by side.
    slot = torch.arange(extra, dtype=torch.int64).expand(rows, -1).contiguous()
    winners = hot.gather(1, torch.searchsorted(copies.cumsum(1), slot, right=True))
    return torch.cat([base, winners], dim=1), logcnt


def _inverse(perm: Tensor) -> Tensor:
    """Row-wise inverse of a batch of permutations."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=perm.dtype).expand_as(perm))


def _hierarchical(
    weight: Tensor, num_phy: int, groups: int, nodes: int, gpus: int, refine: bool
) -> Tensor:
    """phy2log [layers, num_phy] for `groups` expert groups packed onto `nodes` nodes."""
    layers, n = weight.shape
    group_size = n // groups
    log_per_node = n // nodes
    phy_per_node = num_phy // nodes
    gpus_per_node = gpus // nodes

    # 1. Groups onto nodes. "mlog" numbers logical experts node by node.
    group_pack, group_rank = balanced_packing(
        weight.view(layers, groups, group_size).sum(-1), nodes, refine
    )
    group_mlog0 = (group_pack * (groups // nodes) + group_rank) * group_size
    log2mlog = (group_mlog0.unsqueeze(-1) + torch.arange(group_size)).flatten(1)
    mlog2log = _inverse(log2mlog)

    # 2. Replicas inside each node: rows are (layer, node) pairs.
    mlog_weight = weight.gather(1, mlog2log).view(layers * nodes, log_per_node)
    phy2mlog, mlogcnt = replicate_experts(mlog_weight, phy_per_node)

    # 3. Physical experts onto the node's GPUs, each replica carrying load / copies.
    phy_weight = (mlog_weight / mlogcnt).gather(1, phy2mlog)
    pack, rank = balanced_packing(phy_weight, gpus_per_node, refine)
    slot = pack * (phy_per_node // gpus_per_node) + rank
    slot2mlog = phy2mlog.gather(1, _inverse(slot))
    node_base = (torch.arange(nodes, dtype=torch.int64) * log_per_node).repeat(layers).unsqueeze(1)
    slot2mlog = (slot2mlog + node_base).view(layers, num_phy)
    return mlog2log.gather(1, slot2mlog)


def _check(load: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if not isinstance(load, Tensor) or load.dim() != 2 or 0 in load.shape:
        shape = tuple(load.shape) if isinstance(load, Tensor) else type(load).__name__
        raise ValueError(f"load must be a non-empty 2-D tensor [layers, logical experts], got {shape}")
    if load.is_complex() or load.dtype == torch.bool:
        raise ValueError(f"load must hold real numbers, got dtype {load.dtype}")
    for name, value in (
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_logical = load.shape[1]
    if num_replicas < num_logical:
        raise ValueError(
            f"num_replicas ({num_replicas}) is smaller than the number of logical experts "
            f"({num_logical}); every expert needs at least one slot"
        )
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus}) so every "
            f"GPU holds the same number of slots; e.g. use {-(-num_replicas // num_gpus) * num_gpus}"
        )
    if num_logical % num_groups:
        raise ValueError(
            f"num_groups ({num_groups}) must divide the number of logical experts ({num_logical}); "
            "use 1 for models without expert groups"
        )


def rebalance(
    load: Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool | None = None,
    refine: bool = True,
) -> Placement:
    """Compute an expert placement from the load of each logical expert.

    load: [layers, logical experts], e.g. token counts summed over a window (any real
        dtype, non-negative, finite; computed on the CPU in float64).
    num_replicas: physical expert slots per layer (logical experts + redundant ones),
        a multiple of num_gpus.
    num_groups: expert groups of the model (1 if it has none).
    num_nodes, num_gpus: the EP world; num_gpus a multiple of num_nodes.
    hierarchical: None picks hierarchical when num_groups is a multiple of num_nodes and
        global otherwise; True insists on hierarchical; False forces global.
    refine: improve each greedy packing with pairwise swaps (about 20 ms for the global
        policy at 64 GPUs, a few ms hierarchical); False gives plain greedy (LPT)
        packing, as in DeepSeek's EPLB.
    """
    _check(load, num_replicas, num_groups, num_nodes, num_gpus)
    num_replicas, num_groups, num_nodes, num_gpus = map(int, (num_replicas, num_groups, num_nodes, num_gpus))
    weight = load.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("load must be finite and non-negative (token counts or their average)")
    can_nest = num_groups % num_nodes == 0
    if hierarchical and not can_nest:
        raise ValueError(
            f"hierarchical placement needs num_groups ({num_groups}) to be a multiple of "
            f"num_nodes ({num_nodes}); pass hierarchical=None or False for the global policy"
        )
    if hierarchical is None:
        hierarchical = can_nest
    if hierarchical:
        phy2log = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus, refine)
    else:
        phy2log = _hierarchical(weight, num_replicas, 1, 1, num_gpus, refine)
    return Placement.from_phy2log(phy2log, load.shape[1])
