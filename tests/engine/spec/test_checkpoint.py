"""Both published P-EAGLE layouts, written here by hand with their own tensor names and
config keys (reference/peagle.md §2.4), load to the same module; bad checkpoints fail
with errors that say what to change."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.spec.checkpoint import load_head, save_head
from tests.engine.spec.helpers import block_causal_mask, random_head

H, HT, HEADS, KV, D, I, V, DV, MASK = 32, 24, 4, 2, 8, 48, 61, 61, 60


def _published_tensors(head, layer0_prefix: str, mask_shape) -> dict:
    """Un-fused q/k/v and gate/up, as HF-style checkpoints store them."""
    sd = {n: p.detach().clone() for n, p in head.named_parameters()}
    out = {"embed_tokens.weight": sd["embed_tokens"], "lm_head.weight": sd["lm_head"],
           "fc.weight": sd["fc.weight"], "norm.weight": sd["norm.weight"],
           "mask_hidden": sd["mask_hidden"].reshape(mask_shape),
           "d2t": torch.zeros(DV, dtype=torch.int64), "t2d": torch.ones(V, dtype=torch.bool)}
    for i in range(head.cfg.num_layers):
        src, dst = f"layers.{i}.", (layer0_prefix if i == 0 else f"layers.{i}.")
        q, k, v = sd[src + "self_attn.qkv_proj.weight"].split([HEADS * D, KV * D, KV * D])
        gate, up = sd[src + "mlp.gate_up_proj.weight"].split([I, I])
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v,
                    dst + "self_attn.o_proj.weight": sd[src + "self_attn.o_proj.weight"],
                    dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                    dst + "mlp.down_proj.weight": sd[src + "mlp.down_proj.weight"],
                    dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"],
                    dst + "post_attention_layernorm.weight": sd[src + "post_attention_layernorm.weight"]})
        if i == 0:
            out[dst + "hidden_norm.weight"] = sd[src + "hidden_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def write_vllm_layout(head, path):
    """amazon/*-p-eagle style: flat Llama config + ptd_token_id, `midlayer.*`."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D, "num_hidden_layers": 2,
        "intermediate_size": I, "rms_norm_eps": 1e-6, "vocab_size": V, "draft_vocab_size": DV,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "target_hidden_size": HT,
        "ptd_token_id": MASK, "tie_word_embeddings": False}))
    save_file(_published_tensors(head, "midlayer.", (1, 3 * HT)), str(path / "model.safetensors"))


def write_speculators_layout(head, path):
    """speculators `peagle`: nested diff config, `layers.0.*`, mask_hidden [1, 1, 3H]."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "speculators_model_type": "peagle", "architectures": ["PEagleSpeculator"],
        "transformer_layer_config": {"model_type": "llama", "hidden_size": H, "num_attention_heads": HEADS,
                                     "num_key_value_heads": KV, "head_dim": D, "num_hidden_layers": 2,
                                     "intermediate_size": I, "rms_norm_eps": 1e-6, "vocab_size": V,
                                     "max_position_embeddings": 256},
        "draft_vocab_size": DV, "norm_before_residual": False, "target_hidden_size": HT,
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3], "mask_token_id": MASK, "embed_requires_grad": True,
        "speculators_config": {"algorithm": "peagle", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 4}],
                               "verifier": {"name_or_path": "tiny-target", "architectures": ["LlamaForCausalLM"]}}}))
    save_file(_published_tensors(head, "layers.0.", (1, 1, 3 * HT)), str(path / "model.safetensors"))


def _drafts(head):
    g = torch.Generator().manual_seed(0)
    ids, aux = torch.randint(0, V, (7,), generator=g), torch.randn(7, 3 * HT, generator=g)
    return head.propose(aux, ids, torch.arange(7), torch.tensor([0, 7]), block_causal_mask([7]), 3).draft_ids


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_both_published_layouts_and_our_own_load_to_the_same_module(tmp_path):
    ref = random_head(4)
    write_vllm_layout(ref, tmp_path / "vllm")
    write_speculators_layout(ref, tmp_path / "spec")
    a, b = load_head(tmp_path / "vllm"), load_head(tmp_path / "spec")
    assert _same(a, ref) and _same(b, ref)
    assert a.cfg.mask_token_id == b.cfg.mask_token_id == MASK
    assert b.cfg.num_speculative_tokens == 4 and b.cfg.aux_layer_ids == [1, 2, 3]
    assert torch.equal(_drafts(a), _drafts(ref)) and torch.equal(_drafts(b), _drafts(ref))
    # Our writer, in either layout, round-trips too.
    for layout in ("speculators", "vllm"):
        assert _same(load_head(save_head(ref, tmp_path / f"ours-{layout}", layout)), ref)


def test_missing_mask_hidden_is_an_eagle3_head(tmp_path):
    write_vllm_layout(random_head(), tmp_path / "h")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    del tensors["mask_hidden"]
    save_file(tensors, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(ValueError, match="no mask_hidden.*not a P-EAGLE head"):
        load_head(tmp_path / "h")


def test_no_mask_token_id_is_refused(tmp_path):
    write_vllm_layout(random_head(), tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    del cfg["ptd_token_id"]
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="names no mask token"):
        load_head(tmp_path / "h")


def test_embedding_shared_with_the_target_when_absent(tmp_path):
    ref = random_head(2)
    write_speculators_layout(ref, tmp_path / "h")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    del tensors["embed_tokens.weight"]
    save_file(tensors, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(ValueError, match="shared_embedding"):
        load_head(tmp_path / "h")
    assert _same(load_head(tmp_path / "h", shared_embedding=ref.embed_tokens.detach()), ref)


def test_shape_mismatch_names_the_tensor(tmp_path):
    write_speculators_layout(random_head(), tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    cfg["target_hidden_size"] = 20
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fc.weight"):
        load_head(tmp_path / "h")


def test_reduced_draft_vocab_needs_and_uses_d2t(tmp_path):
    ref = random_head(6, draft_vocab_size=20)
    ref.set_d2t(torch.arange(20) * 2)           # draft id i -> target id 3 * i
    save_head(ref, tmp_path / "h", "vllm")
    head = load_head(tmp_path / "h")
    assert head.to_target_ids(torch.tensor([0, 5, 19])).tolist() == [0, 15, 57]
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    del tensors["d2t"]
    save_file(tensors, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(ValueError, match="no d2t"):
        load_head(tmp_path / "h")
