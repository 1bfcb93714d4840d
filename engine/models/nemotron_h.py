"""NemotronH (Nemotron-3 Nano and Super): Mamba-2, attention without positional
encoding, and MoE layers with squared-ReLU experts, one mixer per pre-norm residual
block (`layers_block_type`, or the legacy `hybrid_override_pattern` M/*/E/-).

MoE: sigmoid router (float32) with `e_score_correction_bias` steering the choice,
group-limited top-k, normalised and scaled weights. Super's LatentMoE projects the
token down to `moe_latent_size` before the routed experts and back up after; the
shared expert works on the full hidden state. Multi-token-prediction weights
(`mtp.*`) load into `model.mtp` when the config has `num_nextn_predict_layers` >= 1
(engine/models/nemotron_h_mtp.py, for speculative decoding; the forward never runs it)
and are skipped otherwise.

Norms: the engine's RMSNorm rounds the normalised value before the weight multiply,
transformers' NemotronH after it: identical in float32, within rounding in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache.state_layout import StateLayout
from engine.layers.attention import PagedAttention
from engine.layers.mamba import Mamba2Mixer, MambaShape
from engine.layers.moe import FusedMoE
from engine.layers.norm import RMSNorm
from engine.layers.params import Linear, param
from engine.layers.router import grouped_sigmoid_topk
from engine.models.base import CacheLayout, CausalLM
from engine.ops.attention import AttentionMetadata

MAMBA, ATTENTION, MOE, MLP = "linear_attention", "full_attention", "moe", "mlp"
_SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_LETTERS = {"M": MAMBA, "*": ATTENTION, "E": MOE, "-": MLP}


def check_config(c) -> None:
    """Raise ValueError naming the key and the fix for configs this file cannot build.
    `c` is the parsed config, or config.json's dict (checked before transformers parses
    it, whose own errors for these cases are a KeyError or a validator trace)."""
    get = c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d)
    kinds = get("layers_block_type") or get("layer_types")
    pattern = get("hybrid_override_pattern")
    if kinds is None and isinstance(pattern, str):
        bad = sorted(set(pattern) - set(_LETTERS))
        if bad:
            raise ValueError(f"NemotronH config: hybrid_override_pattern {pattern!r} has unknown layer letters "
                             f"{bad}; use M (Mamba-2), * (attention), E (MoE) or - (MLP)")
        kinds = [_LETTERS[ch] for ch in pattern]
    bad = sorted({k for k in kinds or [] if k not in _LETTERS.values()}, key=str)
    if kinds is not None and (not kinds or bad):
        raise ValueError(f"NemotronH config: layers_block_type has unknown layer types {bad or '(empty)'}; use "
                         f"{MAMBA!r}, {ATTENTION!r}, {MOE!r} or {MLP!r} (hybrid_override_pattern letters M, *, E, -)")
    heads, groups = get("mamba_num_heads"), get("n_groups") or get("mamba_n_groups")
    if heads and groups and heads % groups:
        raise ValueError(f"NemotronH config: mamba_num_heads={heads} is not a multiple of n_groups={groups}; every "
                         f"SSM group must own the same number of heads, so fix mamba_num_heads or n_groups")
    ssm_dtype = str(get("mamba_ssm_cache_dtype") or "float32").removeprefix("torch.")
    if ssm_dtype not in _SSM_DTYPES:
        raise ValueError(f"NemotronH config: mamba_ssm_cache_dtype={ssm_dtype!r} is not one of "
                         f"{', '.join(_SSM_DTYPES)}")
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if get(key, want) != want:
            raise ValueError(f"NemotronH config: {key}={get(key)!r} is not supported (only {want!r})")


class NoPEAttention(nn.Module):
    """GQA with no positional encoding at all (NemotronH's `*` layers)."""

    def __init__(self, c) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, kv = self.nh * self.hd, self.nkv * self.hd
        bias = bool(getattr(c, "attention_bias", False))
        self.qkv_proj = Linear(c.hidden_size, q + 2 * kv, bias=bias, shards=[q, kv, kv])
        self.o_proj = Linear(q, c.hidden_size, bias=bias)
        self.attn = PagedAttention(self.nh, self.nkv, self.hd, self.hd ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        out = self.attn(q.view(t, self.nh, self.hd), k.view(t, self.nkv, self.hd), v.view(t, self.nkv, self.hd), meta)
        return self.o_proj(out.reshape(t, -1))


class ReluSquaredMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class NemotronHMoE(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.c = c
        self.latent = getattr(c, "moe_latent_size", None)
        bias = bool(getattr(c, "mlp_bias", False))
        self.gate = Linear(c.hidden_size, c.n_routed_experts)
        self.gate.e_score_correction_bias = param(c.n_routed_experts)
        self.experts = FusedMoE(c.n_routed_experts, self.latent or c.hidden_size, c.moe_intermediate_size,
                                slot_experts=getattr(c, "ep_slot_experts", None), activation="relu2")
        if self.latent:
            self.fc1_latent_proj = Linear(c.hidden_size, self.latent, bias=bias)
            self.fc2_latent_proj = Linear(self.latent, c.hidden_size, bias=bias)
        self.shared_experts = ReluSquaredMLP(c.hidden_size, c.moe_shared_expert_intermediate_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        logits = F.linear(x.float(), self.gate.weight_in(torch.float32))
        if c.n_group <= 1 or c.topk_group >= c.n_group:
            # Every group is kept (Nano and Super: n_group 1), so the group step is a no-op:
            # the same choice in 3 launches instead of ~10 (each one per MoE layer per step).
            scores = logits.sigmoid()
            ids = (scores + self.gate.e_score_correction_bias.float()).topk(c.num_experts_per_tok, dim=-1)[1]
            weights = scores.gather(1, ids)
            if c.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights, ids = grouped_sigmoid_topk(logits, self.gate.e_score_correction_bias, c.num_experts_per_tok,
                                                c.n_group, c.topk_group, c.norm_topk_prob)
        weights = weights * c.routed_scaling_factor
        shared = self.shared_experts(x)
        if self.latent:
            return self.fc2_latent_proj(self.experts(self.fc1_latent_proj(x), weights, ids)) + shared
        return self.experts(x, weights, ids, shared_out=shared)       # the add rides in the combine


class NemotronHBlock(nn.Module):
    def __init__(self, c, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
        if kind == MAMBA:
            self.mixer = Mamba2Mixer(mamba_shape(c))
        elif kind == ATTENTION:
            self.mixer = NoPEAttention(c)
        elif kind == MOE:
            self.mixer = NemotronHMoE(c)
        else:
            self.mixer = ReluSquaredMLP(c.hidden_size, c.intermediate_size, bool(getattr(c, "mlp_bias", False)))

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = (self.norm(h), h) if residual is None else self.norm(h, residual)
        return (self.mixer(x, meta) if self.kind in (MAMBA, ATTENTION) else self.mixer(x)), residual


def mamba_shape(c) -> MambaShape:
    return MambaShape(c.hidden_size, c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size,
                      c.conv_kernel, c.chunk_size, c.layer_norm_epsilon, bool(c.use_conv_bias), bool(c.use_bias))


class NemotronHForCausalLM(CausalLM):
    stacked_params = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2)]
    check_raw_config = staticmethod(check_config)

    def __init__(self, config) -> None:
        check_config(config)
        config.rms_norm_eps = config.layer_norm_epsilon    # the base class builds the final norm from it
        super().__init__(config)
        self.mtp = None
        if int(getattr(config, "num_nextn_predict_layers", 0) or 0) >= 1:
            # Imported here: that file builds on this one's blocks.
            from engine.models.nemotron_h_mtp import NemotronHMTP
            self.mtp = NemotronHMTP(config)

    def make_layer(self, index: int) -> nn.Module:
        return NemotronHBlock(self.config, self.config.layers_block_type[index])

    def attention_layers(self) -> list[nn.Module]:
        return [b.mixer.attn for b in self.layers if b.kind == ATTENTION]

    def mamba_layers(self) -> list[Mamba2Mixer]:
        return [b.mixer for b in self.layers if b.kind == MAMBA]

    def moe_layers(self) -> list[nn.Module]:
        # The main stack's only: EP and EPLB run collectives per MoE layer in every
        # forward (an idle rank enters each one), and the MTP block is not in the forward.
        return [m for m in self.layers.modules() if isinstance(m, FusedMoE)]

    def cache_layout(self) -> CacheLayout:
        c = self.config
        # At least one layer's worth, so a model without attention still sizes a block.
        return CacheLayout(max(1, len(self.attention_layers())), 2, c.num_key_value_heads, c.head_dim)

    def state_layout(self) -> StateLayout | None:
        n = len(self.mamba_layers())
        if n == 0:
            return None
        s = mamba_shape(self.config)
        dtype = _SSM_DTYPES[str(getattr(self.config, "mamba_ssm_cache_dtype", "float32")).removeprefix("torch.")]
        return StateLayout(n, (s.conv_kernel - 1, s.conv_dim), (s.num_heads, s.head_dim, s.d_state), dtype)

    def resolve(self, name: str) -> tuple[str, object] | None:
        if name.startswith("mtp."):
            # Its names are its parameters' names (q/k/v and experts fused as in the stack).
            return super().resolve(name) if self.mtp is not None else None
        if name.startswith("backbone."):
            name = "model." + name.removeprefix("backbone.")
        name = name.replace("model.embeddings.", "model.embed_tokens.").replace("model.norm_f.", "model.norm.")
        return super().resolve(name)
