"""DeepSeek-V2 and -V3: MLA attention, shared + routed experts, dense first layers.

V3 routes with sigmoid scores, a correction bias and group limits (noaux_tc); V2 with
softmax scores, greedy or group-limited, unnormalised. Both scale the routed output
by `routed_scaling_factor`.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.mlp import GatedMLP
from engine.layers.mla import MLAAttention
from engine.layers.moe import FusedMoE, Routing
from engine.layers.params import Linear, param
from engine.layers.router import grouped_sigmoid_topk, group_limited_softmax_topk
from engine.models.base import CacheLayout, CausalLM, DecoderLayer


class DeepseekMoE(nn.Module):
    def __init__(self, config, v3: bool) -> None:
        super().__init__()
        c = config
        self.v3 = v3
        self.config = c
        self.gate = Linear(c.hidden_size, c.n_routed_experts)
        if v3:
            self.gate.e_score_correction_bias = param(c.n_routed_experts)
        self.experts = FusedMoE(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                                slot_experts=getattr(c, "ep_slot_experts", None))
        self.shared_experts = (GatedMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
                               if c.n_shared_experts else None)

    # The router's logits are float32 (as the reference computes them from x.float()).
    logits_dtype = torch.float32

    def route(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> Routing:
        c = self.config
        if logits is None:
            logits = nn.functional.linear(x.float(), self.gate.weight_in(torch.float32))
        if self.v3:
            w, ids = grouped_sigmoid_topk(logits, self.gate.e_score_correction_bias, c.num_experts_per_tok,
                                          c.n_group, c.topk_group, c.norm_topk_prob)
        elif getattr(c, "topk_method", "greedy") == "group_limited_greedy":
            w, ids = group_limited_softmax_topk(logits, c.num_experts_per_tok, c.n_group, c.topk_group)
        else:       # top-k, scaling, expert map and load count (and entry sort) in one launch on the device
            return self.experts.softmax_route(x, logits, c.num_experts_per_tok, False, c.routed_scaling_factor)
        return Routing(w * c.routed_scaling_factor, ids)       # FusedMoE maps the ids

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """logits: the router's, when computed together with the norm in front
        (engine/models/base.py); else computed here."""
        shared = None if self.shared_experts is None else self.shared_experts(x)
        return self.experts(x, *self.route(x, logits), shared_out=shared)      # the add rides in the combine


class DeepseekV3ForCausalLM(CausalLM):
    v3 = True
    # MLA has no q/k/v projections to fuse; only the MLPs stack gate and up.
    stacked_params = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    def make_layer(self, index: int) -> nn.Module:
        c = self.config
        dense = index < c.first_k_dense_replace or index % getattr(c, "moe_layer_freq", 1) != 0
        mlp = GatedMLP(c.hidden_size, c.intermediate_size) if dense else DeepseekMoE(c, self.v3)
        return DecoderLayer(c, MLAAttention(c), mlp)

    def cache_layout(self) -> CacheLayout:
        c = self.config
        return CacheLayout(c.num_hidden_layers, 1, 1, c.kv_lora_rank + c.qk_rope_head_dim)


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    v3 = False
