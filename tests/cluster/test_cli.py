"""`tandem serve` in `vllm serve`'s shape: its options, the settings they make, and a live
server started from the command line (a real local Ray of the test's own)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
from dataclasses import fields

import httpx
import openai
import pytest
import yaml

from cluster.cli import parser
from cluster.serve_args import ENGINE_FIELDS_ELSEWHERE, ENGINE_FLAGS, app_args
from engine.config import EngineConfig
from tests.ray_cluster import (
    BIN,
    REPO,
    free_port,
    new_token,
    ray_env,
    session_pids,
    short_temp_dir,
    stop_session,
    wait_until,
)

VLLM_FLAGS = ("--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
              "--gpu-memory-utilization", "--enable-prefix-caching", "--no-enable-prefix-caching",
              "--enable-chunked-prefill", "--seed", "--served-model-name", "--api-key", "--kv-transfer-config",
              "--speculative-config", "--config")


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["serve", *argv])


def test_every_engine_setting_has_a_flag():
    flagged = {f.field for f in ENGINE_FLAGS}
    assert flagged | set(ENGINE_FIELDS_ELSEWHERE) == {f.name for f in fields(EngineConfig)}


def test_help_has_vllms_flags_each_with_a_help_line_and_its_default():
    p = serve_parser()
    text = p.format_help()
    for flag in VLLM_FLAGS:
        assert flag in text, flag
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "(default: " in action.help, action.option_strings or action.dest
    assert "(default: 16)" in next(a.help for a in p._actions if "--block-size" in a.option_strings)


def test_settings_layer_config_yaml_then_config_file_then_flags(tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(
        {"mode": "colocated", "engine": {"max_num_seqs": 8, "dtype": "bfloat16"}, "slo": {"ttft_ms": 50}}))
    ns = parse("/models/Tiny-MoE", "--config", str(tmp_path / "mine.yaml"), "--dtype", "float32",
               "--max-model-len", "512", "--no-enable-prefix-caching", "--enforce-eager", "--seed", "7",
               "--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                                   "kv_load_failure_policy": "fail", "lease_s": 5}))
    args = app_args(ns)
    assert args["model"] == "/models/Tiny-MoE" and args["served_model_name"] == "Tiny-MoE"
    assert args["mode"] == "colocated"                                   # from the file
    assert args["slo"] == {"ttft_ms": 50, "itl_ms": 100}                 # the file's key over config.yaml's
    engine = args["engine"]
    assert engine["max_num_seqs"] == 8 and engine["dtype"] == "float32"  # flag over file
    assert engine["max_model_len"] == 512 and engine["enable_prefix_caching"] is False
    assert engine["enable_cuda_graphs"] is False and engine["seed"] == 7
    assert engine["block_size"] == 16                                    # config.yaml's
    assert engine["kv_load_failure_policy"] == "fail" and args["kv_transfer"] == {"kv_connector": "NixlConnector", "lease_s": 5}
    assert "enable_chunked_prefill" in engine and engine["enable_chunked_prefill"] is True


def test_speculative_config_from_the_flag_over_the_config_file(tmp_path):
    spec = {"method": "peagle", "model": "/heads/p-eagle", "num_speculative_tokens": 5,
            "num_speculative_tokens_per_batch": [[16, 3], [64, 1]]}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"engine": {"speculative_config": {**spec, "model": "/other"}}}))
    assert app_args(parse("--config", str(tmp_path / "mine.yaml")))["engine"]["speculative_config"]["model"] == "/other"
    args = app_args(parse("--config", str(tmp_path / "mine.yaml"), "--speculative-config", json.dumps(spec)))
    assert args["engine"]["speculative_config"] == spec


def test_no_flags_is_config_yaml_in_mode_pd():
    args = app_args(parse())
    assert args == yaml.safe_load((REPO / "config.yaml").read_text())["applications"][0]["args"]
    assert args["mode"] == "pd"


def test_device_cuda_asks_ray_for_a_gpu_per_engine():
    pools = app_args(parse("--device", "cuda"))["pools"]
    assert pools["prefill"]["num_gpus"] == 1 and pools["decode"]["num_gpus"] == 1
    assert pools["colocated"]["num_gpus"] == 1
    assert pools["router"]["num_gpus"] == 0              # the router holds no engine
    assert app_args(parse())["pools"]["decode"]["num_gpus"] == 0


@pytest.mark.parametrize(("config", "message"), [
    ("{not json", "not JSON"),
    ('{"kv_connector": "LMCacheConnectorV1"}', "LMCacheConnectorV1"),
    ('{"kv_buffer_size": 1}', "kv_buffer_size"),
])
def test_bad_kv_transfer_config_says_what_is_wrong(config, message):
    with pytest.raises(SystemExit, match=message):
        app_args(parse("--kv-transfer-config", config))


def test_unknown_kv_connector_in_app_settings_is_a_start_up_error():
    from cluster.settings import parse_settings
    with pytest.raises(ValueError, match=r"kv_connector 'Mooncake' is not available \(available: NixlConnector\)"):
        parse_settings({"kv_transfer": {"kv_connector": "Mooncake"}})
    spec = parse_settings({"kv_transfer": {"lease_s": 5}}).kv_connector_spec(host="10.0.0.1")
    assert spec.connector == "disagg.nixl_connector:NixlConnector" and spec.kwargs == {"lease_s": 5, "host": "10.0.0.1"}


@pytest.fixture(scope="module")
def references():
    """Greedy tokens and logprobs of the embedded model's folder in float32 and bfloat16."""
    from engine import LLM, SamplingParams
    from engine.default_model import default_model_path

    path = str(default_model_path())
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1)
    out = {}
    for dtype in ("float32", "bfloat16"):
        o = LLM(path, dtype=dtype, max_model_len=512).generate(["tandem serve"], params)[0].outputs[0]
        out[dtype] = (o.token_ids, [lp[t] for lp, t in zip(o.logprobs, o.token_ids)])
    return path, out


def test_tandem_serve_model_with_engine_flags_serves_with_those_settings(references, tmp_path):
    """`tandem serve MODEL --max-model-len 512 --dtype float32 ...` from the shell. A
    --config file asks for bfloat16 and --dtype float32 must win: the served logprobs are
    float32's, and bfloat16's differ (checked, so the comparison can tell them apart)."""
    path, want = references
    fp32, bf16 = want["float32"][1], want["bfloat16"][1]
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) > 1e-3
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"engine": {"dtype": "bfloat16", "max_num_seqs": 4}}))
    port, key = free_port(), "sekret"
    command = [str(BIN / "tandem"), "serve", path, "--config", str(tmp_path / "mine.yaml"),
               "--max-model-len", "512", "--dtype", "float32", "--served-model-name", "tiny", "--api-key", key,
               "--port", str(port), "--no-enable-prefix-caching", "--seed", "3"]
    env = ray_env(None, RAY_TMPDIR=str(short_temp_dir()), RAY_AUTH_TOKEN=new_token())
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until(lambda: ("Ctrl-C stops it." in log.read_text() or proc.poll() is not None, log.read_text()),
                   "tandem serve to start", 300)
        banner = log.read_text()
        assert proc.poll() is None, banner
        base = f"http://127.0.0.1:{port}"
        for page in ("/v1", "/docs", "/metrics", "/dashboard", "/health"):
            assert f"{base}{page} " in banner, banner
        for page in ("/docs", "/metrics", "/dashboard", "/health"):
            assert httpx.get(base + page, timeout=30).status_code == 200, page
        assert "Token authentication is enabled" not in banner and "Connecting to existing" not in banner

        assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        [model] = client.models.list().data
        assert model.id == "tiny" and model.model_extra["max_model_len"] == 512
        r = client.completions.create(model="tiny", prompt="tandem serve", max_tokens=6, temperature=0, logprobs=1)
        got = r.choices[0].logprobs.token_logprobs
        assert max(abs(a - b) for a, b in zip(got, fp32)) < 1e-4, (got, fp32)
        with pytest.raises(openai.BadRequestError):                       # 600 tokens > --max-model-len
            client.completions.create(model="tiny", prompt=[1] * 600, max_tokens=1)

        proc.send_signal(signal.SIGINT)                                   # Ctrl-C
        assert proc.wait(timeout=120) == 0
        output = log.read_text()
        assert "Stopped." in output
        for alarming in ("Traceback", "failed", "ERROR", "graceful_shutdown"):
            assert alarming not in output, output[-3000:]
        wait_until(lambda: (not session_pids(proc.pid), str(session_pids(proc.pid))),
                   "the local Ray instance to stop with tandem serve", 60)
    finally:
        stop_session(proc.pid)
