"""The head's forward against an independent one assembled from transformers' Llama
modules, following the speculators EAGLE-3 first layer (split cat(embeds, hidden),
input_layernorm on the embedding half, hidden_norm on the hidden half, residual =
pre-norm hidden) and vLLM's P-EAGLE inputs (mask token + fc(mask_hidden) in MTP rows),
with weights taken from a vLLM-layout checkpoint by their published names."""

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from engine.spec.checkpoint import load_head
from tests.engine.spec.helpers import block_causal_mask, random_head
from tests.engine.spec.test_checkpoint import write_vllm_layout


def _hf_reference(w: dict, cfg, ids, aux, pos, is_mask):
    H = cfg.hidden_size
    lc = LlamaConfig(hidden_size=H, intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                     vocab_size=cfg.vocab_size, max_position_embeddings=256, rope_theta=10000.0)
    lc._attn_implementation = "eager"
    layers = []
    for i in range(cfg.num_layers):
        layer = LlamaDecoderLayer(lc, i)
        prefix = "midlayer." if i == 0 else f"layers.{i}."
        if i == 0:
            for p in ("q_proj", "k_proj", "v_proj"):
                old = getattr(layer.self_attn, p)
                setattr(layer.self_attn, p, torch.nn.Linear(2 * H, old.out_features, bias=False))
            layer.hidden_norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        own = {k.removeprefix(prefix): v for k, v in w.items() if k.startswith(prefix)}
        layer.load_state_dict(own, strict=True)
        layers.append(layer.eval())
    fc = lambda x: x @ w["fc.weight"].T   # noqa: E731
    embeds = w["embed_tokens.weight"][torch.where(is_mask, cfg.mask_token_id, ids)][None]
    hidden = torch.where(is_mask[:, None], fc(w["mask_hidden"].reshape(1, -1)), fc(aux))[None]
    T = ids.shape[0]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    cos_sin = LlamaRotaryEmbedding(lc)(hidden, pos[None])
    first = layers[0]
    residual = hidden
    x = torch.cat([first.input_layernorm(embeds), first.hidden_norm(hidden)], dim=-1)
    h = residual + first.self_attn(x, position_embeddings=cos_sin, attention_mask=mask)[0]
    h = h + first.mlp(first.post_attention_layernorm(h))
    for layer in layers[1:]:
        out = layer(h, attention_mask=mask, position_ids=pos[None], position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out
    norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
    norm.weight.data.copy_(w["norm.weight"])
    return (norm(h) @ w["lm_head.weight"].T)[0]


@torch.no_grad()
def test_head_matches_a_transformers_reference(tmp_path):
    write_vllm_layout(random_head(8, num_layers=2), tmp_path / "h")
    head = load_head(tmp_path / "h")
    w = load_file(str(tmp_path / "h" / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    T, K = 9, 4
    ids, aux = torch.randint(0, 60, (T,), generator=g), torch.randn(T, 72, generator=g)
    pos = torch.arange(T)
    is_mask, _ = head.layout(torch.tensor([0, T]), T, K)
    normed, _ = head(ids, aux, pos, is_mask, block_causal_mask([T]))
    want = _hf_reference(w, head.cfg, ids, aux, pos, is_mask)
    torch.testing.assert_close(head.compute_logits(normed), want, rtol=1e-4, atol=1e-4)
