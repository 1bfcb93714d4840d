"""Qwen3-MoE: Qwen3 attention, softmax top-k routing, no shared expert."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.mlp import GatedMLP
from engine.layers.moe import FusedMoE
from engine.layers.params import Linear
from engine.models.base import CacheLayout, CausalLM, DecoderLayer
from engine.models.llama import GQAAttention, gqa_cache_layout


class Qwen3MoeBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        c = config
        self.top_k, self.renormalize = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = Linear(c.hidden_size, c.num_experts)
        self.experts = FusedMoE(c.num_experts, c.hidden_size, c.moe_intermediate_size,
                                slot_experts=getattr(c, "ep_slot_experts", None))

    logits_dtype = None     # the activations' (the router is a plain bf16 projection)

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """logits: the router's, when computed together with the norm in front
        (engine/models/base.py); else computed here."""
        # Top-k, expert map, load count (and at decode sizes the experts' entry sort) in
        # one launch (engine/layers/moe.py).
        routing = self.experts.softmax_route(x, self.gate(x) if logits is None else logits, self.top_k,
                                             self.renormalize, out_dtype=x.dtype)
        return self.experts(x, *routing)


class Qwen3MoeForCausalLM(CausalLM):
    def make_layer(self, index: int) -> nn.Module:
        c = self.config
        sparse = index not in (c.mlp_only_layers or []) and (index + 1) % c.decoder_sparse_step == 0
        mlp = Qwen3MoeBlock(c) if sparse else GatedMLP(c.hidden_size, c.intermediate_size)
        return DecoderLayer(c, GQAAttention(c, qk_norm=True), mlp)

    def cache_layout(self) -> CacheLayout:
        return gqa_cache_layout(self.config)
