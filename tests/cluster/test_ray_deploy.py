"""`ray serve deploy config.yaml` against a real local cluster (`ray start --head`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def sh(*args: str, timeout: int = 180, check: bool = True) -> str:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    r = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail("the ray CLI is not installed in this environment")
    tmp = tmp_path_factory.mktemp("ray")
    sh("ray", "stop", "--force", check=False)
    sh("ray", "start", "--head", "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={tmp}",
       "--include-dashboard=true", "--dashboard-port=8265")
    yield
    sh("ray", "stop", "--force", check=False)


def deploy(config_file: str | Path) -> None:
    sh("serve", "deploy", str(config_file))
    deadline = time.time() + 240
    status = ""
    while time.time() < deadline:
        status = sh("serve", "status", check=False)
        if "status: RUNNING" in status and "DEPLOYING" not in status:
            break
        time.sleep(3)
    assert "status: RUNNING" in status, status


def test_serve_deploy_config_yaml_runs_the_app(ray_cluster):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    deploy("config.yaml")
    port = config["http_options"]["port"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
    name = config["applications"][0]["args"]["served_model_name"]
    assert [m.id for m in client.models.list()] == [name]
    r = client.completions.create(model=name, prompt="over Ray", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    sh("serve", "shutdown", "-y")


def test_prefill_decode_pools_hand_off_over_nixl(ray_cluster, default_llm, tmp_path):
    """config.yaml in mode pd: a prefill replica and a decode replica (Ray actors) with
    the KV handed over through NIXL; the answer equals one engine's."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["applications"][0]["args"]["mode"] = "pd"
    (tmp_path / "pd.yaml").write_text(yaml.safe_dump(config))
    deploy(tmp_path / "pd.yaml")
    status = sh("serve", "status")
    assert "Prefill" in status and "Decode" in status, status
    port = config["http_options"]["port"]
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=2)
    name = config["applications"][0]["args"]["served_model_name"]
    from engine import SamplingParams
    for prompt in ("over Ray", "a prompt of a few more words than one block of sixteen tokens"):
        r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        want = default_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
        assert r.choices[0].text == want.outputs[0].text
    metrics = httpx.get(base + "/metrics", timeout=30).text
    moved = [line for line in metrics.splitlines() if line.startswith("tandem_kv_transfer_bytes_total{")]
    assert moved and float(moved[0].rsplit(" ", 1)[1]) > 0, metrics[-2000:]
    sh("serve", "shutdown", "-y")
