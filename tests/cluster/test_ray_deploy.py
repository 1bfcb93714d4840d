"""`ray serve deploy config.yaml` on real local clusters, each the test's own (see
tests/ray_cluster.py): the README's cluster lines as written, on a fresh home with Ray's
default token authentication, and mode colocated on a head started by the helper."""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import openai
import pytest
import yaml

from tests.ray_cluster import (
    BIN, REPO, RayHead, free_port, node_port_flags, ray_env, run, short_temp_dir, stop_session, wait_until,
)

CLUSTER_LINE = "ray start --head && ray serve deploy config.yaml && serve status"


def readme_cluster_block() -> str:
    """The README's shell block that holds the cluster line."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    [block] = [b for b in blocks if CLUSTER_LINE in b]
    return block


def config_on_port(port: int, **args) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(args)
    return config


def serve_running(env: dict, *flags: str):
    def check():
        out = run(["serve", "status", *flags], env, check=False)
        return "status: RUNNING" in out and "DEPLOYING" not in out, out
    return check


def test_readme_cluster_lines_run_as_written_with_ray_token_auth(default_llm):
    """The README's block, run by bash on a fresh home (no ~/.ray, no RAY_* variables).
    Two changes keep it off any other cluster on the machine, nothing else: `ray start
    --head` gets a temp dir and free ports (RAY_DASHBOARD_ADDRESS points the Serve CLI at
    that dashboard), and config.yaml's HTTP port is a free one. Token authentication stays
    as Ray sets it: the dashboard must refuse a request without the token."""
    tmp = short_temp_dir()
    home, work = tmp / "home", tmp / "work"
    home.mkdir(), work.mkdir()
    port, dashboard_port = free_port(), free_port()
    (work / "config.yaml").write_text(yaml.safe_dump(config_on_port(port)))
    isolation = " ".join([f"--temp-dir={tmp / 'ray'}", f"--port={free_port()}", f"--dashboard-port={dashboard_port}",
                          f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *node_port_flags()])
    block = readme_cluster_block().replace("ray start --head", f"ray start --head {isolation}")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env = ray_env(None, HOME=str(home), PATH=f"{BIN}:{ray_env(None)['PATH']}", RAY_DASHBOARD_ADDRESS=dashboard)
    shell = subprocess.Popen(["bash", "-e", "-c", block], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = shell.communicate(timeout=300)
        assert shell.returncode == 0, out[-4000:]
        assert "tandem" in out, out[-4000:]                      # `serve status` listed the app
        assert (home / ".ray" / "auth_token").is_file()
        assert httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).status_code == 401
        authed = dict(env, RAY_AUTH_MODE="token")                # what the block exported
        status = wait_until(serve_running(authed), "the application to run", 300)
        assert "Prefill" in status and "Decode" in status, status  # config.yaml is pd
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
        name = config_on_port(port)["applications"][0]["args"]["served_model_name"]
        assert [m.id for m in client.models.list()] == [name]
        from engine import SamplingParams
        for prompt in ("over Ray", "a prompt of a few more words than one block of sixteen tokens"):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
            want = default_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
            assert r.choices[0].text == want.outputs[0].text
        # Engine replicas publish their series to the router's /metrics every second.
        deadline = time.monotonic() + 30
        while True:
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            moved = [line for line in metrics.splitlines() if line.startswith("tandem_kv_transfer_bytes_total{")]
            if (moved and float(moved[0].rsplit(" ", 1)[1]) > 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert moved and float(moved[0].rsplit(" ", 1)[1]) > 0, metrics[-2000:]
        run(["serve", "shutdown", "-y"], authed, check=False)
    finally:
        stop_session(shell.pid)


@pytest.fixture(scope="module")
def head():
    with RayHead(num_cpus=1) as h:
        yield h


def test_serve_deploy_in_mode_colocated_with_an_expert_parallel_pool(head, tmp_path, default_llm):
    """config.yaml in mode colocated whose pool is expert-parallel (2 ranks with EPLB, in
    the replica's placement group), on the head's one CPU: 0.1 for the replica, 0.4 per rank."""
    port = free_port()
    config = config_on_port(port, mode="colocated")
    pool = config["applications"][0]["args"]["pools"]["colocated"]
    pool.update(num_cpus=0.4, parallel={"data_parallel_size": 2, "enable_expert_parallel": True,
                                        "enable_eplb": True})
    (tmp_path / "colocated.yaml").write_text(yaml.safe_dump(config))
    head.ray("serve", "deploy", "-a", head.dashboard, str(tmp_path / "colocated.yaml"))
    try:
        status = wait_until(serve_running(head.env, "-a", head.dashboard), "the application to run", 300)
        assert "Colocated" in status and "Decode" not in status, status
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
        name = config["applications"][0]["args"]["served_model_name"]
        from engine import SamplingParams
        r = client.completions.create(model=name, prompt="over Ray", max_tokens=5, temperature=0)
        want = default_llm.generate(["over Ray"], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].text
        assert r.usage.completion_tokens == 5 and r.choices[0].text == want
    finally:
        head.ray("serve", "shutdown", "-a", head.dashboard, "-y", check=False)
