"""Expert-parallel MoE: send each routed token to the rank that holds its expert slot,
compute there, send the result back and combine.

Attention runs data-parallel: every rank routes its own tokens. The physical expert
slots of a layer are split evenly over the EP ranks (rank r holds slots
[r * S, (r + 1) * S)), so a slot's owner is `slot // S`. One MoE forward is three
all-to-alls over the EP group: the per-rank pair counts, the token rows with their
(local slot, weight) metadata, and the weighted expert outputs on the way back. Each
(token, choice) pair travels on its own, so a token's outputs come back separately and
are summed in ascending *logical* expert order: the same additions, in the same order,
as the single-process reference (which visits experts in ascending id), whatever the
placement and whichever replica served the token.

The same code runs gloo on CPU and NCCL on GPU. The receive sizes come back to the host
(one sync per layer), as in DeepEP's normal mode. With low-latency buffers attached
(ep_low_latency.py) the layer writes into peer-mapped memory instead: no collective
and no sync, for decode steps up to a fixed token count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.layers.ep_low_latency import (
    LowLatencyBuffers,
    low_latency_moe,
    sum_pairs_in_logical_order,
)
from engine.layers.expert_map import ExpertMap
from engine.ops.moe import fused_moe


class ExpertParallel:
    """One rank's place in the EP group, shared by every MoE layer of its model."""

    def __init__(self, rank: int, world_size: int, slots_per_rank: int, group=None) -> None:
        if not 0 <= rank < world_size or slots_per_rank < 1:
            raise ValueError(f"bad EP layout: rank {rank} of {world_size}, {slots_per_rank} slots per rank")
        self.rank, self.world_size, self.slots_per_rank = rank, world_size, slots_per_rank
        self.group = group
        # Set: every MoE forward takes the low-latency path (all ranks of a group agree).
        self.low_latency: LowLatencyBuffers | None = None

    @property
    def first_slot(self) -> int:
        return self.rank * self.slots_per_rank

    @property
    def num_physical(self) -> int:
        return self.world_size * self.slots_per_rank

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_split: list[int] | None = None,
                    in_split: list[int] | None = None) -> None:
        dist.all_to_all_single(out, inp, out_split, in_split, group=self.group)

    def forward(self, moe: nn.Module, x: torch.Tensor, weights: torch.Tensor, phys: torch.Tensor,
                logical_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/phys/logical_ids [T, k] (phys: global slot ids) -> [T, H].
        H is the experts' input width (a LatentMoE's latent size, not the hidden size)."""
        if self.low_latency is not None:
            return low_latency_moe(self.low_latency, self.slots_per_rank, moe, x, weights, phys, logical_ids)
        tokens, k = phys.shape
        hidden = x.shape[1]
        flat = phys.reshape(-1)
        owner = torch.div(flat, self.slots_per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        num_recv = sum(recv_split)

        rows = x[torch.div(order, k, rounding_mode="floor")]
        # float64 holds a slot id and a float32 (or bf16) weight exactly; its bytes ride
        # at the end of each token row, so rows and metadata are one message.
        meta = torch.stack([(flat - owner * self.slots_per_rank)[order].double(),
                            weights.reshape(-1)[order].double()], dim=1)
        row_bytes = hidden * x.element_size()
        packed = torch.cat([rows.view(torch.uint8).reshape(-1, row_bytes), meta.view(torch.uint8)], dim=1)
        recv = packed.new_empty(num_recv, row_bytes + 16)
        self._all_to_all(recv, packed, recv_split, send_split)
        recv_rows = recv[:, :row_bytes].contiguous().view(x.dtype)
        recv_meta = recv[:, row_bytes:].contiguous().view(torch.float64)

        expert_out = self.compute(moe, recv_rows, recv_meta[:, :1].long(), recv_meta[:, 1:].float())
        back = x.new_empty(tokens * k, hidden)
        self._all_to_all(back, expert_out, send_split, recv_split)
        return combine_in_logical_order(back, order, logical_ids, x)

    def compute(self, moe: nn.Module, rows: torch.Tensor, local_slots: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """The received rows through this rank's experts, one (slot, weight) per row."""
        return fused_moe(rows, moe.w13, moe.w2, local_slots, weights, activation=moe.activation)


def combine_in_logical_order(back: torch.Tensor, order: torch.Tensor, logical_ids: torch.Tensor,
                             like: torch.Tensor) -> torch.Tensor:
    """Sum each token's k weighted expert outputs (back, in dispatch order) in ascending
    logical expert id, starting from zero, as the reference's expert loop does."""
    tokens, k = logical_ids.shape
    per_pair = torch.empty_like(back)
    per_pair[order] = back
    return sum_pairs_in_logical_order(per_pair.view(tokens, k, like.shape[1]), logical_ids)


@torch.no_grad()
def attach_expert_parallel(layers: list[nn.Module], ep: ExpertParallel, expert_map: ExpertMap | None,
                           weights_from_model: bool = True) -> None:
    """Turn the MoE layers (a model's, in forward order) into their EP shards.

    expert_map: [moe layers, ep.num_physical] slots over the group (-1 for a slot with
    no expert yet); None keeps the layers' current maps. With
    weights_from_model the layers' loaded weights serve this rank's slots: either the
    layers loaded only this rank's slots (FusedMoE(slot_experts=...), which must match
    phy2log), or they hold every logical expert once (identity map) and the rank keeps
    copies of its slots' experts. Otherwise the slots' weights arrive by migration (until
    then the map sends them no tokens).
    """
    if expert_map is not None and (expert_map.num_layers, expert_map.num_slots) != (len(layers), ep.num_physical):
        raise ValueError(f"the expert map has shape {tuple(expert_map.phy2log.shape)}, expected "
                         f"({len(layers)}, {ep.num_physical}) for {len(layers)} MoE layers")
    lo, hi = ep.first_slot, ep.first_slot + ep.slots_per_rank
    for i, moe in enumerate(layers):
        local = expert_map.phy2log[i, lo:hi] if expert_map is not None else torch.arange(lo, hi)
        holds_all = moe.w13.shape[0] == moe.num_experts and torch.equal(moe.phy2log.cpu(),
                                                                          torch.arange(moe.num_experts))
        if weights_from_model and holds_all:
            if bool((local < 0).any()):
                raise ValueError("a slot of this rank has no expert; cannot take its weights from the model")
            idx = local.to(moe.w13.device)
            w13, w2 = moe.w13.data.index_select(0, idx), moe.w2.data.index_select(0, idx)
        elif weights_from_model:
            if moe.w13.shape[0] != ep.slots_per_rank or not torch.equal(moe.phy2log.cpu(), local):
                raise ValueError(f"the layer loaded experts {moe.phy2log.tolist()}, but this rank's slots "
                                 f"hold {local.tolist()}")
            w13, w2 = moe.w13.data, moe.w2.data
        elif moe.w13.shape[0] == ep.slots_per_rank:
            w13, w2 = moe.w13.data, moe.w2.data        # contents unused until migration fills them
        else:
            w13 = moe.w13.data.new_zeros(ep.slots_per_rank, *moe.w13.shape[1:])
            w2 = moe.w2.data.new_zeros(ep.slots_per_rank, *moe.w2.shape[1:])
        moe.w13 = nn.Parameter(w13, requires_grad=False)
        moe.w2 = nn.Parameter(w2, requires_grad=False)
        regroup_layer(moe, ep, expert_map.layer(i) if expert_map is not None else None)


def regroup_layer(moe: nn.Module, ep: ExpertParallel, layer_map: ExpertMap | None) -> None:
    """Point a sharded MoE layer at a (new) EP group: global slot count, load counter,
    expert map. The local weights stay: slots per rank never change."""
    if moe.w13.shape[0] != ep.slots_per_rank:
        raise ValueError(f"the layer holds {moe.w13.shape[0]} slots, the group has {ep.slots_per_rank} per rank")
    moe.ep = ep
    moe.num_physical = ep.num_physical
    moe.expert_load = torch.zeros(ep.num_physical, dtype=torch.long, device=moe.expert_load.device)
    if layer_map is not None:
        moe.set_expert_map(layer_map)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The model's MoE layers in forward order (module registration order)."""
    return model.moe_layers()


@torch.inference_mode()
def dummy_moe_pass(model: nn.Module) -> None:
    """Enter every MoE layer's collectives with no tokens of our own (an idle rank still
    serves the tokens other ranks send to its experts)."""
    for moe in moe_layers(model):
        x = torch.empty(0, moe.w2.shape[1], dtype=moe.w2.dtype, device=moe.w2.device)
        ids = torch.empty(0, 1, dtype=torch.long, device=x.device)
        moe(x, torch.empty(0, 1, dtype=torch.float32, device=x.device), ids)
