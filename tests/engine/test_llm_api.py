"""The offline API on the embedded default model."""

from __future__ import annotations

import json

from engine import LLM, SamplingParams
from engine.default_model import default_model_path


def test_default_model_is_deepseek_v3_and_deterministic():
    path = default_model_path()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (path / "tokenizer.json").is_file()


def test_generate_strings_and_token_ids(default_llm):
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    by_text, by_ids = default_llm.generate(["Hello", default_llm.tokenizer.encode("Hello")], sp)
    assert by_text.token_ids == by_ids.token_ids and len(by_text.token_ids) == 5
    assert by_text.finish_reason == "length"
    assert by_text.text == default_llm.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)
    for token, step in zip(by_text.token_ids, by_text.logprobs):
        assert token in step and 3 <= len(step) <= 4
        assert max(step.values()) <= 0.0


def test_stop_strings_and_stop_token_ids(default_llm):
    base = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = default_llm.generate(["stop test"], base)[0]
    assert len(full.text) > 3
    stop = full.text[2:4]
    cut = default_llm.generate(["stop test"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                            stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    token = full.token_ids[3]
    by_id = default_llm.generate(["stop test"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                              stop_token_ids=[token]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids[-1] == token
    assert token not in by_id.token_ids[:-1]


def test_random_load_format_builds_real_shapes_without_weights():
    llm = LLM("default", load_format="random", max_model_len=64)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    moe = llm.engine.model.moe_layers()
    assert moe and int(moe[0].expert_load.sum()) > 0      # routing counted tokens per expert
