"""Shape and settings of a P-EAGLE draft head, read from either published config.json
layout (reference/peagle.md §2.4):

- vLLM-native EAGLE-3 layout (amazon/*-p-eagle): a flat Llama config whose
  `num_hidden_layers` counts the midlayer, plus `draft_vocab_size` and the mask id
  under `ptd_token_id` (or `pard_token` / `mask_token_id`).
- speculators `peagle` layout: `speculators_model_type: "peagle"`, the decoder shape in
  `transformer_layer_config` (a diff against the Llama/Qwen3 defaults), `mask_token_id`,
  `target_hidden_size`, `eagle_aux_hidden_state_layer_ids`, `speculators_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from engine.layers.rotary import rope_parameters

# Mask-id keys in the order vLLM looks them up (first match wins).
MASK_ID_KEYS = ("mask_token_id", "pard_token", "ptd_token_id")


@dataclass
class PEagleConfig:
    hidden_size: int
    num_layers: int                  # decoder layers, the midlayer (layer 0) included
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                  # the target's vocabulary
    draft_vocab_size: int
    mask_token_id: int
    target_hidden_size: int
    aux_layer_ids: list[int] | None = None   # target layers tapped (inputs of those layers)
    rms_norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False            # Qwen3-style decoder layers
    norm_before_residual: bool = False
    num_speculative_tokens: int | None = None   # depth the head was trained for, when known

    def __post_init__(self) -> None:
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask token id {self.mask_token_id} is outside the vocabulary "
                             f"(size {self.vocab_size}); fix the mask id in the head's config.json")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} exceeds the target vocabulary "
                             f"{self.vocab_size}")
        if self.num_layers < 1:
            raise ValueError("a P-EAGLE head needs at least one decoder layer")

    def layer_config(self) -> SimpleNamespace:
        """The attribute view engine/models/llama.py's attention reads."""
        return SimpleNamespace(
            hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            attention_bias=self.attention_bias, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, rope_parameters=dict(self.rope))


def _mask_id(cfg: dict) -> int:
    for key in MASK_ID_KEYS:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise ValueError(f"the head's config.json names no mask token ({' / '.join(MASK_ID_KEYS)}): it is not a "
                     f"P-EAGLE (parallel drafting) head; add the id the head was trained with")


def _layer_fields(c: dict, mask_id: int, qk_norm: bool) -> dict:
    heads = c["num_attention_heads"]
    rope_src = SimpleNamespace(rope_parameters=c.get("rope_parameters"), rope_scaling=c.get("rope_scaling"),
                               rope_theta=c.get("rope_theta", 10000.0))
    return dict(
        hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
        draft_vocab_size=c.get("draft_vocab_size") or c["vocab_size"], mask_token_id=mask_id,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope=rope_parameters(rope_src),
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
        qk_norm=qk_norm)


def from_vllm_config(cfg: dict) -> PEagleConfig:
    """The flat vLLM-native EAGLE-3 layout (Llama config + ptd_token_id)."""
    aux = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids")
    return PEagleConfig(**_layer_fields(cfg, _mask_id(cfg), qk_norm=cfg.get("model_type") == "qwen3"),
                        target_hidden_size=cfg.get("target_hidden_size") or cfg["hidden_size"],
                        aux_layer_ids=list(aux) if aux else None,
                        norm_before_residual=bool(cfg.get("norm_before_residual", False)),
                        num_speculative_tokens=cfg.get("num_speculative_tokens"))


def from_speculators_config(cfg: dict) -> PEagleConfig:
    """The speculators `peagle` layout; `transformer_layer_config` is a diff against the
    transformers defaults of its model_type, so those defaults are filled back in."""
    from transformers import AutoConfig
    layer = dict(cfg["transformer_layer_config"])
    model_type = layer.pop("model_type", "llama")
    full = AutoConfig.for_model(model_type, **layer).to_dict()
    depth = None
    for method in (cfg.get("speculators_config") or {}).get("proposal_methods") or []:
        depth = method.get("speculative_tokens", depth)
    aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    fields = _layer_fields(full, _mask_id(cfg), qk_norm=model_type == "qwen3")
    fields["draft_vocab_size"] = cfg.get("draft_vocab_size") or fields["vocab_size"]
    return PEagleConfig(**fields, target_hidden_size=cfg.get("target_hidden_size") or full["hidden_size"],
                        aux_layer_ids=list(aux) if aux else None,
                        norm_before_residual=bool(cfg.get("norm_before_residual", False)),
                        num_speculative_tokens=depth)


def unsupported_options(cfg: dict) -> list[str]:
    """EAGLE-3.1 options this head does not implement (they change the forward)."""
    return [k for k in ("norm_before_fc", "fc_norm", "norm_output") if cfg.get(k)]


def default_aux_layers(num_target_layers: int) -> list[int]:
    """vLLM's default taps when a head names none: (2, L // 2, L - 3)."""
    return [2, num_target_layers // 2, num_target_layers - 3]


def check_fits_target(cfg: PEagleConfig, target_config, num_spec: int, max_spec: int) -> list[int]:
    """Start-up check of a head against its target and the asked K; returns the target
    layers to tap. Raises with what to change; nothing here runs per step."""
    if not 1 <= num_spec <= max_spec:
        raise ValueError(f"num_speculative_tokens must be between 1 and {max_spec}, got {num_spec}")
    if cfg.target_hidden_size != target_config.hidden_size:
        raise ValueError(f"the head fuses target hidden states of size {cfg.target_hidden_size}, the target's are "
                         f"{target_config.hidden_size}: this head was trained for another model")
    if cfg.vocab_size != target_config.vocab_size:
        raise ValueError(f"the head's vocabulary ({cfg.vocab_size}) differs from the target's "
                         f"({target_config.vocab_size}): this head was trained for another model")
    layers = cfg.aux_layer_ids or default_aux_layers(target_config.num_hidden_layers)
    if len(layers) != 3 or not all(0 <= i < target_config.num_hidden_layers for i in layers):
        raise ValueError(f"the head taps target layers {layers}; the target has {target_config.num_hidden_layers} "
                         f"layers and P-EAGLE fuses exactly three")
    if cfg.num_speculative_tokens and num_spec > cfg.num_speculative_tokens:
        raise ValueError(f"the head was trained to draft {cfg.num_speculative_tokens} tokens; "
                         f"num_speculative_tokens={num_spec} asks for more (acceptance collapses past the trained depth)")
    return list(layers)
