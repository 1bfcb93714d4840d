"""The embedded default model: a small DeepSeek-V3-architecture checkpoint with random
weights and a byte-level tokenizer, written deterministically to a cache folder on
first use, so everything runs without a download. Its text is meaningless.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

NAME = "tandem-default-deepseek-v3-tiny-v1"
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
# A plain role-tagged template (the model's text is meaningless; this only has to be stable).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def default_model_path() -> Path:
    """The folder of the default model, created on first call."""
    path = cache_dir() / NAME
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=NAME + ".", dir=path.parent))
    try:
        _write(tmp)
        try:
            tmp.rename(path)
        except OSError:   # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(folder: Path) -> None:
    tokenizer = _byte_tokenizer()
    tokenizer.save_pretrained(str(folder))
    model = _random_model(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    model.save_pretrained(str(folder))


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                   pad_token=SPECIAL[2], model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _random_model(bos: int, eos: int, pad: int):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=len(SPECIAL) + 256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
        max_position_embeddings=4096, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = DeepseekV3ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in model.model.layers[config.first_k_dense_replace:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    finally:
        torch.random.set_rng_state(state)
    return model
