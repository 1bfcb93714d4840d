"""What every causal LM in the engine shares: embedding, decoder stack, final norm,
LM head, the KV-cache layout it needs, and checkpoint-name resolution.

A family supplies its decoder layer (`make_layer`) and says how its checkpoint names
map onto fused parameters (`stacked_params`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.norm import RMSNorm
from engine.layers.params import param
from engine.ops.attention import AttentionMetadata
from engine.ops.norm_linear import decode_fused

_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<kind>gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CacheLayout:
    """Per-token cache shape of the attention layers: cache tensors are
    [num_blocks, num_layers, entries, block_size, kv_heads, dim] so one block holds
    every layer's data for its tokens and moves between engines as one piece."""
    num_layers: int
    entries: int        # 2 (K and V) or 1 (MLA: V is a prefix of the latent entry)
    kv_heads: int
    dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * self.entries * block_size * self.kv_heads * self.dim * elem


class CausalLM(nn.Module):
    # (fused param name, checkpoint name, shard index), matched on ".name." components.
    stacked_params: list[tuple[str, str, int]] = [
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    ]

    # Speculative decoding (engine/spec): the inputs of these layers (the pre-norm
    # residual stream, what Hugging Face calls hidden_states[i]) are kept by each
    # forward in `aux_hidden`, [T, 3 * hidden], concatenated in this order.
    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.aux_hidden: torch.Tensor | None = None
        self.embed_tokens = param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = param(config.vocab_size, config.hidden_size)

    def make_layer(self, index: int) -> nn.Module:
        raise TypeError(f"{type(self).__name__} must define make_layer")

    def cache_layout(self) -> CacheLayout:
        raise TypeError(f"{type(self).__name__} must define cache_layout")

    def attention_layers(self) -> list[nn.Module]:
        """The PagedAttention module of each layer, in cache order."""
        return [layer.self_attn.attn for layer in self.layers]

    def reserve_positions(self, num_positions: int) -> None:
        """Size every rotary cos/sin table for positions up to num_positions."""
        from engine.layers.rotary import RotaryEmbedding
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.reserve(num_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens[input_ids]
        residual = None
        taps = {}
        for i, layer in enumerate(self.layers):
            if i in self.aux_layer_ids:
                taps[i] = h if residual is None else h + residual
            h, residual = layer(h, residual, positions, meta)
        if taps:
            self.aux_hidden = torch.cat([taps[i] for i in self.aux_layer_ids], dim=-1)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.tie_word_embeddings else self.lm_head
        return nn.functional.linear(hidden, head).float()

    def moe_layers(self) -> list[nn.Module]:
        from engine.layers.moe import FusedMoE
        return [m for m in self.modules() if isinstance(m, FusedMoE)]

    # -- checkpoint names ----------------------------------------------------------
    def resolve(self, name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (our parameter name, shard), or None to skip it."""
        if "rotary_emb.inv_freq" in name:
            return None
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= self.config.num_hidden_layers:
            return None   # multi-token-prediction layers: not part of the main model
        name = name.removeprefix("model.")
        if name == "lm_head.weight":
            return ("lm_head" if not self.tie_word_embeddings else None), None
        if name == "embed_tokens.weight":
            return "embed_tokens", None
        if m := _EXPERT.match(name):
            which = "w2" if m["kind"] == "down" else "w13"
            part = {"gate": 0, "up": 1, "down": None}[m["kind"]]
            return f"{m['prefix']}.{which}", (int(m["e"]), part)
        if m := _FUSED_EXPERTS.match(name):
            which = "w13" if m["kind"] == "gate_up_proj" else "w2"
            return f"{m['prefix']}.{which}", (None, None)
        for fused, original, shard in self.stacked_params:
            if f".{original}." in name:
                return name.replace(f".{original}.", f".{fused}."), shard
        return name, None


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)). The residual is
    carried separately so norms see the sum exactly as the reference models do.

    At decode sizes (engine/ops/norm_linear.py `decode_fused`) each norm runs inside the
    projection after it: the input norm in the attention's first projection (attention
    modules with `input_proj` and `forward_projected`; `reads_input`: whether they also
    take the normalised rows), the post-attention norm in an MoE block's router (`gate`;
    the block then takes the logits, in its `logits_dtype`)."""

    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # Each norm adds the residual in the same launch (engine/ops/norm.py).
        attn = self.self_attn
        if decode_fused(h) and hasattr(attn, "forward_projected"):
            y, res, x = self.input_layernorm.then_linear(h, residual, attn.input_proj, store_normed=attn.reads_input)
            residual = h if residual is None else res
            h = attn.forward_projected(y, x, positions, meta)
        else:
            if residual is None:
                x, residual = self.input_layernorm(h), h
            else:
                x, residual = self.input_layernorm(h, residual)
            h = attn(x, positions, meta)
        gate = getattr(self.mlp, "gate", None)
        if gate is not None and decode_fused(h):
            logits, residual, x = self.post_attention_layernorm.then_linear(
                h, residual, gate, store_normed=True, out_dtype=self.mlp.logits_dtype)
            return self.mlp(x, logits), residual
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual
