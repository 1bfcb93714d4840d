"""Load and save P-EAGLE heads (config.json + safetensors).

Layouts (reference/peagle.md §2.4), told apart by config.json:
- "speculators": `speculators_model_type: "peagle"`; weights `layers.N.*` (layer 0 is
  the 2H-wide midlayer), `mask_hidden` [1, 1, 3H].
- "vllm": the vLLM-native EAGLE-3 layout (amazon/*-p-eagle): flat Llama config plus
  `ptd_token_id`; weights `midlayer.*` for layer 0, `layers.1..N-1.*`, `mask_hidden`.
Both may carry `d2t` (draft->target offsets; `t2d` is ignored, as vLLM does) and may
omit `embed_tokens` / `lm_head`, which are then shared with the target.

Our trainer (engine/spec/train.py) writes the speculators layout, so its heads also
serve in vLLM; its extra `tandem_training` config block is informational.

As in engine/models/loader.py, loading proves completeness: every parameter element is
written exactly once and every checkpoint tensor lands somewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.loader import construct, iter_safetensors
from engine.spec.config import (PEagleConfig, from_speculators_config, from_vllm_config,
                                unsupported_options)
from engine.spec.head import PEagleHead

_FUSED = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
          ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
SHAREABLE = ("embed_tokens", "lm_head")


def detect_layout(cfg: dict) -> str:
    if cfg.get("speculators_model_type") == "peagle":
        return "speculators"
    if cfg.get("speculators_model_type"):
        raise ValueError(f"speculators checkpoint of type {cfg['speculators_model_type']!r}; "
                         f"only 'peagle' heads draft in parallel")
    return "vllm"


def read_config(path: Path) -> tuple[str, PEagleConfig, dict]:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: pass the folder of a P-EAGLE head")
    raw = json.loads(file.read_text())
    if bad := unsupported_options(raw):
        raise ValueError(f"the head uses EAGLE-3.1 options {bad}, which this engine does not implement")
    layout = detect_layout(raw)
    cfg = from_speculators_config(raw) if layout == "speculators" else from_vllm_config(raw)
    return layout, cfg, raw


def resolve(name: str) -> tuple[str | None, object]:
    """Checkpoint tensor name (either layout) -> (our parameter name, shard)."""
    name = name.removeprefix("model.")
    if name == "t2d" or "rotary_emb.inv_freq" in name:
        return None, None
    name = name.replace("midlayer.", "layers.0.", 1) if name.startswith("midlayer.") else name
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return name.removesuffix(".weight"), None
    for fused, original, shard in _FUSED:
        if f".{original}." in name:
            return name.replace(f".{original}.", f".{fused}."), shard
    return name, None


@torch.no_grad()
def load_head(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              shared_embedding: torch.Tensor | None = None, shared_lm_head: torch.Tensor | None = None,
              ) -> PEagleHead:
    """Build a head from a checkpoint folder of either layout. `shared_*`: the target's
    embedding / LM head, used when the checkpoint has none of its own."""
    path = Path(path)
    layout, cfg, _ = read_config(path)
    head = construct(lambda: PEagleHead(cfg), dtype, device)
    params = dict(head.named_parameters())
    written = {n: 0 for n in params}
    unexpected, d2t = [], None
    for ckpt_name, tensor in iter_safetensors(path):
        name, shard = resolve(ckpt_name)
        if name is None:
            continue
        if layout == "vllm" and ckpt_name.removeprefix("model.").startswith("layers.0."):
            unexpected.append(ckpt_name)   # vLLM layout names layer 0 "midlayer"
            continue
        if name == "d2t":
            d2t = tensor
            continue
        if name not in params:
            unexpected.append(ckpt_name)
            continue
        p = params[name]
        if name == "mask_hidden":
            tensor = tensor.reshape(-1)   # [3H], [1, 3H] and [1, 1, 3H] all occur
        try:
            written[name] += p.loader(p.data, tensor.to(p.dtype), shard)
        except ValueError as e:
            raise ValueError(f"head tensor {ckpt_name} does not match its config.json: {e}") from e
    if unexpected:
        raise ValueError(f"{layout}-layout head has tensors its config has no place for: {_few(unexpected)}")
    if written["mask_hidden"] == 0:
        raise ValueError(f"{path} has no mask_hidden tensor: it is an EAGLE-3 head, not a P-EAGLE head, and "
                         f"cannot draft in parallel; use a P-EAGLE checkpoint or train one (engine/spec/train.py)")
    for name, shared in (("embed_tokens", shared_embedding), ("lm_head", shared_lm_head)):
        if written[name] == 0 and shared is not None:
            written[name] += params[name].loader(params[name].data, shared.to(params[name].dtype), None)
    missing = [n for n, p in params.items() if written[n] != p.numel()]
    if missing:
        hint = (" (embed_tokens / lm_head: pass the target's as shared_embedding / shared_lm_head)"
                if set(missing) & set(SHAREABLE) else "")
        raise ValueError(f"head parameters missing from {path} (or loaded twice): {_few(missing)}{hint}")
    if d2t is not None:
        head.set_d2t(d2t)
    elif cfg.draft_vocab_size != cfg.vocab_size:
        raise ValueError(f"the head's draft vocabulary ({cfg.draft_vocab_size}) is smaller than the target's "
                         f"({cfg.vocab_size}) but the checkpoint has no d2t map")
    return head.eval()


# -- writing ---------------------------------------------------------------------------

def _layer_config(cfg: PEagleConfig) -> dict:
    rope = dict(cfg.rope)
    out = dict(model_type="qwen3" if cfg.qk_norm else "llama", hidden_size=cfg.hidden_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
               num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
               intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
               rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
               attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, rope_theta=rope.pop("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    return out


def checkpoint_config(cfg: PEagleConfig, layout: str, verifier: str | None = None) -> dict:
    if layout == "vllm":
        return dict(_layer_config(cfg), architectures=["LlamaForCausalLMEagle3"],
                    draft_vocab_size=cfg.draft_vocab_size, ptd_token_id=cfg.mask_token_id,
                    target_hidden_size=cfg.target_hidden_size, norm_before_residual=cfg.norm_before_residual,
                    eagle_aux_hidden_state_layer_ids=cfg.aux_layer_ids)
    if layout == "speculators":
        depth = cfg.num_speculative_tokens or 1
        return dict(speculators_model_type="peagle", architectures=["PEagleSpeculator"],
                    transformer_layer_config=_layer_config(cfg), draft_vocab_size=cfg.draft_vocab_size,
                    norm_before_residual=cfg.norm_before_residual, target_hidden_size=cfg.target_hidden_size,
                    eagle_aux_hidden_state_layer_ids=cfg.aux_layer_ids, mask_token_id=cfg.mask_token_id,
                    embed_requires_grad=True,
                    speculators_config=dict(algorithm="peagle", default_proposal_method="greedy",
                                            proposal_methods=[dict(proposal_type="greedy", speculative_tokens=depth)],
                                            verifier=dict(name_or_path=verifier, architectures=[])))
    raise ValueError(f"unknown layout {layout!r}: 'speculators' or 'vllm'")


def checkpoint_tensors(head: PEagleHead, layout: str) -> dict[str, torch.Tensor]:
    """The head's weights under the layout's names, fused weights split back."""
    cfg = head.cfg
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    splits = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), [q, kv, kv]),
              "gate_up_proj": (("gate_proj", "up_proj"), [cfg.intermediate_size] * 2)}
    out: dict[str, torch.Tensor] = {}
    for name, p in head.named_parameters():
        t = p.detach().contiguous().cpu()
        if name in SHAREABLE:
            name += ".weight"
        if layout == "vllm" and name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        if name == "mask_hidden":
            t = t.view(1, 1, -1) if layout == "speculators" else t.view(1, -1)
        for fused, (parts, sizes) in splits.items():
            if f".{fused}." in name:
                for part, piece in zip(parts, t.split(sizes)):
                    out[name.replace(fused, part)] = piece.contiguous()
                break
        else:
            out[name] = t
    out["d2t"] = head.d2t.cpu()
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[head.to_target_ids(torch.arange(cfg.draft_vocab_size, device=head.d2t.device)).cpu()] = True
    out["t2d"] = t2d
    return out


def save_head(head: PEagleHead, path: str | Path, layout: str = "speculators", verifier: str | None = None,
              extra_config: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(checkpoint_config(head.cfg, layout, verifier), **(extra_config or {}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(checkpoint_tensors(head, layout), str(path / "model.safetensors"))
    return path


def _few(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
