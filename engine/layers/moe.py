"""Fused mixture-of-experts layer with a logical-to-physical expert map.

Routers pick logical experts; the map turns each choice into one physical expert
slot (a logical expert may have several replicas, placed by EPLB). Replicas of one
expert share its tokens round-robin by (token, slot) index, which spreads them evenly
and deterministically. Every forward adds its per-slot token counts to `expert_load`
on the device, without a host sync; EPLB reads and resets it on its own schedule.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.layers.expert_map import ExpertMap
from engine.layers.params import param
from engine.ops.moe import fused_moe, plan_alignment
from engine.ops.norm_linear import decode_fused
from engine.ops.router import softmax_topk_physical, to_physical


class Routing(NamedTuple):
    """A router's choice for each token: weights and logical experts [T, k], and where
    the routing kernel already mapped them, the physical slots (and at decode sizes the
    experts' entry sort, engine/kernels/moe.py Alignment); else None."""
    weights: torch.Tensor
    logical_ids: torch.Tensor
    phys: torch.Tensor | None = None
    alignment: object = None


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int, num_physical: int | None = None,
                 slot_experts: list[int] | None = None, activation: str = "silu") -> None:
        super().__init__()
        self.num_experts = num_experts
        # slot_experts: the expert each slot loads, when this layer holds only an EP
        # rank's own slots (engine/layers/ep_dispatch.py); default: one slot per expert.
        self.num_physical = len(slot_experts) if slot_experts is not None else num_physical or num_experts
        self.inter = inter
        # "silu": w13 = gate rows | up rows; "relu2" (not gated): w13 = up rows only.
        self.activation = activation
        self.gated = activation == "silu"
        self.w13 = param(self.num_physical, (2 if self.gated else 1) * inter, hidden, loader=self._load_expert)
        self.w2 = param(self.num_physical, hidden, inter, loader=self._load_expert)
        identity = torch.arange(num_experts)
        self.register_buffer("phy2log", identity.clone() if slot_experts is None else torch.tensor(slot_experts),
                             persistent=False)
        self.register_buffer("log2phy", identity[:, None].clone(), persistent=False)
        self.register_buffer("logcnt", torch.ones(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("expert_load", torch.zeros(self.num_physical, dtype=torch.long), persistent=False)
        # Expert parallelism (engine/layers/ep_dispatch.py): when set, w13/w2 hold only
        # this rank's slots and forward dispatches tokens to the slots' owners.
        self.ep = None

    def set_expert_map(self, m: ExpertMap) -> None:
        """Swap in this layer's map (a one-layer ExpertMap; the weights must already sit
        in their new slots). While the slot count stays, the maps are written in place:
        a captured CUDA graph reads them at fixed addresses. log2phy keeps room for the
        most copies one expert can have (every spare slot), padded with -1 (never read:
        replica indices stay below logcnt)."""
        if m.num_layers != 1 or m.num_logical != self.num_experts:
            raise ValueError(f"expected the map of one layer of {self.num_experts} experts, got "
                             f"{m.num_layers} layers of {m.num_logical}")
        m.check_routable()
        phy2log, log2phy, logcnt = m.phy2log[0], m.log2phy[0], m.logcnt[0]
        device = self.log2phy.device
        width = self.num_physical - self.num_experts + 1
        if int(logcnt.max()) > width:
            raise ValueError(f"an expert has {int(logcnt.max())} copies in {self.num_physical} slots")
        log2phy = log2phy[:, :width]
        if self.phy2log.shape != phy2log.shape or self.log2phy.shape[1] != width:
            self.phy2log = torch.empty_like(phy2log, device=device)
            self.log2phy = torch.empty(self.num_experts, width, dtype=log2phy.dtype, device=device)
            self.logcnt = torch.empty_like(logcnt, device=device)
        self.phy2log.copy_(phy2log)
        self.log2phy.fill_(-1)
        self.log2phy[:, :log2phy.shape[1]].copy_(log2phy)
        self.logcnt.copy_(logcnt)

    def expert_map(self) -> ExpertMap:
        """This layer's current map (one layer)."""
        return ExpertMap.from_phy2log(self.phy2log.cpu()[None], self.num_experts)

    def softmax_route(self, x: torch.Tensor, logits: torch.Tensor, top_k: int, renormalize: bool,
                      scale: float = 1.0, out_dtype: torch.dtype = torch.float32) -> Routing:
        """Softmax top-k routing of x's tokens through this layer's map, the load counted,
        in one launch on the device; at decode sizes that launch also sorts the entries
        for the experts' GEMMs (no align launch of their own). Pass it to forward:
        `self.experts(x, *routing)`."""
        alignment = plan_alignment(x, self.w13, top_k, self.activation) if self.ep is None and decode_fused(x) else None
        return Routing(*softmax_topk_physical(logits, top_k, renormalize, self.log2phy, self.logcnt,
                                              self.expert_load, scale, out_dtype, alignment=alignment))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, logical_ids: torch.Tensor,
                phys: torch.Tensor | None = None, alignment=None, shared_out: torch.Tensor | None = None) -> torch.Tensor:
        """phys (and alignment): from softmax_route, the load already counted; else the map
        and the load count run here, in one launch on the device (engine/ops/router.py).
        shared_out: the shared experts' output, added to the result (in the combine's
        launch, without expert parallelism)."""
        if phys is None:
            phys = to_physical(logical_ids, self.log2phy, self.logcnt, self.expert_load)
        if self.ep is not None:
            # x is what the experts take (for a LatentMoE, the latent vector): that is
            # what travels to the experts' ranks.
            out = self.ep.forward(self, x, weights, phys, logical_ids)
            return out if shared_out is None else out + shared_out
        return fused_moe(x, self.w13, self.w2, phys, weights, activation=self.activation, alignment=alignment,
                         shared_out=shared_out)

    def _load_expert(self, p: torch.Tensor, w: torch.Tensor, shard: object) -> int:
        """shard = (logical expert, part): part 0/1 = gate/up rows of w13, None = whole slot
        (w2, or a fused gate_up); expert None = every expert at once ([E, ...] tensors)."""
        expert, part = shard
        if expert is None:
            return sum(self._load_expert(p, w[e], (e, part)) for e in range(self.num_experts))
        if part is not None and not self.gated:
            if part == 0:
                raise ValueError(f"expert {expert} has a gate projection, but the experts' activation "
                                 f"{self.activation!r} is not gated")
            part = 0    # the up rows are the only rows
        written = 0
        for slot in (self.phy2log == expert).nonzero().flatten().tolist():
            dst = p[slot] if part is None else p[slot, part * self.inter:(part + 1) * self.inter]
            if dst.shape != w.shape:
                raise ValueError(f"expected shape {tuple(dst.shape)} for expert {expert}, "
                                 f"checkpoint has {tuple(w.shape)}")
            dst.copy_(w)
            written += w.numel()
        return written
