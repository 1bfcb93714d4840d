"""`ray serve deploy config.yaml` against a real local cluster (`ray start --head`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def test_serve_deploy_config_yaml_runs_the_app(ray_cluster):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    sh("serve", "deploy", "config.yaml")
    deadline = time.time() + 240
    status = ""
    while time.time() < deadline:
        status = sh("serve", "status", check=False)
        if "status: RUNNING" in status and "DEPLOYING" not in status:
            break
        time.sleep(3)
    assert "status: RUNNING" in status, status
    port = config["http_options"]["port"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
    name = config["applications"][0]["args"]["served_model_name"]
    assert [m.id for m in client.models.list()] == [name]
    r = client.completions.create(model=name, prompt="over Ray", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    sh("serve", "shutdown", "-y")
