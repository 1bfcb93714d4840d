"""Tiny random checkpoints of every supported family, built with transformers."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
COMMON = dict(vocab_size=256, hidden_size=64, max_position_embeddings=512, rms_norm_eps=1e-6)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        COMMON, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        tie_word_embeddings=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
        rope_parameters=YARN, tie_word_embeddings=False)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_parameters=YARN, tie_word_embeddings=False)),
    "deepseek_v2_grouped": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        norm_topk_prob=False, tie_word_embeddings=False)),
}

# Hybrid models (Mamba state per request): prefix caching is off for them, so they are
# tested apart (tests/engine/test_nemotron_h.py). Nano layout (plain MoE, n_group 1) and
# Super layout (LatentMoE, group-limited routing); every layer type of the pattern.
NEMOTRON_H = dict({k: v for k, v in COMMON.items() if k != "rms_norm_eps"}, hybrid_override_pattern="ME*EM-E",
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
                  chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5, norm_topk_prob=True,
                  intermediate_size=96, layer_norm_epsilon=1e-5, tie_word_embeddings=False)
HYBRID_CONFIGS = {
    "nemotron_h_nano": ("NemotronHConfig", "NemotronHForCausalLM", dict(NEMOTRON_H, n_group=1, topk_group=1)),
    "nemotron_h_super": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        NEMOTRON_H, moe_latent_size=32, n_group=2, topk_group=1)),
}


def build(family: str, folder: Path, seed: int = 0, **overrides):
    """Build, randomise and save a tiny model; returns the transformers model (eval, fp32).
    overrides: config fields changed from the family's (e.g. head_dim)."""
    config_cls, model_cls, kwargs = CONFIGS[family] if family in CONFIGS else HYBRID_CONFIGS[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
        # Larger-than-default weights give peaked, tie-free distributions.
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("dt_bias"):
                # Mamba step sizes dt = softplus(dt_raw + dt_bias) stay above transformers'
                # prefill clamp (1e-3) for dt_raw > -3 (5 sigma here), where its prefill and
                # decode paths agree (reference/models.md).
                p.uniform_(-3.0, -1.0)
    model.generation_config.eos_token_id = None
    model.save_pretrained(str(folder))
    return model


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and its per-step log-softmax [n, vocab]."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([step[0] for step in out.logits]).float().log_softmax(-1)
    return tokens, logprobs


def assert_logprobs_match(outs, refs, atol: float, label: str) -> None:
    """Each output's greedy tokens are transformers' and its 256 log-probabilities per step
    (logprobs=256) lie within atol of `refs`' [(tokens, log-softmax [n, 256])]."""
    for out, (ref_tokens, ref_lp) in zip(outs, refs, strict=True):
        assert out.token_ids == ref_tokens, f"{label}: prompt {out.prompt_token_ids[:4]}..."
        ours = torch.tensor([[step[t] for t in range(256)] for step in out.logprobs])
        assert torch.allclose(ours, ref_lp, atol=atol), (ours - ref_lp).abs().max()
