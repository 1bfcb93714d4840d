"""Bad requests and bad checkpoints fail clearly, and never disturb other requests."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from tests.engine.tiny_models import build


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
])
def test_bad_sampling_params(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_leave_the_batch_alone(default_llm):
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = default_llm.generate(["good one", "good two"], sp)
    with pytest.raises(ValueError, match="empty"):
        default_llm.generate(["good one", ""], sp)
    with pytest.raises(ValueError, match="max_model_len"):
        default_llm.generate(["x" * 300], sp)
    with pytest.raises(ValueError, match=r"token ids must be in"):
        default_llm.generate([[1, 2, 10**6]], sp)
    assert not default_llm.engine.has_unfinished()
    again = default_llm.generate(["good one", "good two"], sp)
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]


def test_bad_request_between_steps_does_not_disturb_running_requests(default_llm):
    from engine.request import Request
    core = default_llm.engine
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = default_llm.generate([[10, 11, 12]], sp)[0].token_ids
    core.add_request(Request("ok", [10, 11, 12], sp))
    core.step()
    with pytest.raises(ValueError):
        core.add_request(Request("bad", [], sp))
    tokens = []
    while core.has_unfinished():
        tokens += [t for o in core.step() for t in o.new_token_ids]
    assert ref[1:] == tokens


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build("llama", folder)
    return folder


def test_unknown_architecture(tiny_folder, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*MysteryForCausalLM"):
        LLM(str(bad))


def test_missing_safetensors(tiny_folder, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_folder, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(bad))


def test_truncated_safetensors(tiny_folder, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(str(bad))


def test_weights_that_do_not_match_the_config(tiny_folder, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the config"):
        LLM(str(bad))
    cfg["intermediate_size"] = 128
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        LLM(str(bad))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))


def test_bad_engine_settings():
    with pytest.raises(ValueError, match="block_size"):
        LLM("default", block_size=0)
    with pytest.raises(TypeError, match="unknown engine arguments"):
        LLM("default", blok_size=4)


def test_out_of_memory_at_start_says_what_fits_and_what_to_lower(monkeypatch):
    import torch

    import engine.core.engine_core as ec

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ec, "ModelRunner", no_memory)
    with pytest.raises(ValueError) as e:
        LLM("default", num_kv_blocks=400, max_model_len=256)
    msg = str(e.value)
    assert "out of device memory at start-up" in msg and "400 blocks" in msg
    assert "gpu_memory_utilization" in msg and "num_kv_blocks" in msg and "max_num_seqs" in msg


def test_kv_cache_smaller_than_one_sequence_says_what_to_lower():
    with pytest.raises(ValueError, match="lower max_model_len or give the cache more memory"):
        LLM("default", kv_cache_memory_gb=1e-6)
