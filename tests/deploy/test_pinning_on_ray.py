"""The chart's pool pinning on a real local Ray cluster shaped like the chart's: a head
with num-cpus 0, and a node per worker group started the way KubeRay starts it (the
group's rendered rayStartParams as `ray start --key=value` flags through `bash -lc`).
`serve deploy` of the chart's serveConfigV2 must then run the app with each pool's engine
replica holding one unit of the resource that only its own group's node advertises.

Mode colocated keeps this to one engine (a minute on two cores); that each group
advertises only its own pool's resource, and each pool asks only for its own, is checked
for mode pd on the rendered objects in test_deploy_pinning.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from deploy_support import one, pod_groups, render_file
from live_support import REPO, free_port

BIN = Path(sys.executable).parent
# The chart's ports are per pod; these nodes share one machine, so each gets free ones.
PER_NODE_PORTS = ("metrics-export-port", "dashboard-agent-listen-port", "runtime-env-agent-port")


def env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))


def run(*args: str, timeout: float = 120, check: bool = True) -> str:
    r = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=timeout, env=env(), cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


def ray_start_command(params: dict[str, str], address: str) -> str:
    """The `ray start` line KubeRay builds from a group's rayStartParams (`--key=value`,
    values verbatim, run by bash), with per-node ports made free."""
    params = {**params, **{k: str(free_port()) for k in PER_NODE_PORTS}}
    flags = " ".join(f"--{key}={value}" for key, value in params.items())
    return f"{BIN / 'ray'} start --block --address={address} --num-cpus=1 {flags}"


@contextlib.contextmanager
def ray_node(command: list[str], log: Path) -> Iterator[None]:
    """A `ray start --block` process in its own process group, ended with it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)    # raylet and GCS stop on SIGTERM...
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)    # ...`ray start --block` itself ignores it
        proc.wait(timeout=10)


def gcs_listening(port: int):
    def check():
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0, f"nothing listens on {port}"
    return check


def wait_until(check, what: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}:\n{last[-3000:]}")


MODE, POOLS = "colocated", ("colocated",)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(GCS address, dashboard URL, rayservice): a head and one node per pool's group."""
    if not (BIN / "ray").exists():
        pytest.fail("the ray CLI is not installed in this environment")
    rayservice = one(render_file("default", {"serveConfig": {"application": {"args": {"mode": MODE}}}}),
                     "RayService")
    groups = pod_groups(rayservice)
    assert sorted(groups) == sorted(["head", *POOLS])
    tmp = tmp_path_factory.mktemp("ray")
    gcs, dashboard = free_port(), free_port()
    head_params = {**groups["head"]["rayStartParams"], **{k: str(free_port()) for k in PER_NODE_PORTS}}
    head = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={tmp}",
            f"--dashboard-port={dashboard}", "--include-dashboard=true", "--disable-usage-stats",
            *(f"--{k}={v}" for k, v in head_params.items())]
    address = f"127.0.0.1:{gcs}"

    def nodes(count: int):
        def check():
            out = run("ray", "status", f"--address={address}", check=False)
            return len(re.findall(r"^\s*1 node_", out, re.M)) == count, out
        return check

    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_node(head, tmp / "head.log"))
        wait_until(gcs_listening(gcs), "the head's GCS", 90)
        for pool in POOLS:
            command = ["bash", "-lc", ray_start_command(groups[pool]["rayStartParams"], address)]
            stack.enter_context(ray_node(command, tmp / f"{pool}.log"))
        wait_until(nodes(1 + len(POOLS)), "the worker groups' nodes", 90)
        yield address, f"http://127.0.0.1:{dashboard}", rayservice


def test_serve_deploy_places_the_pool_on_its_group(cluster, tmp_path):
    address, dashboard, rayservice = cluster
    status = run("ray", "status", f"--address={address}")
    for pool in POOLS:   # each node advertises its pool's resource, parsed from the chart's string
        assert f"0.0/1000.0 tandem_pool_{pool}" in status, status
    document = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    port = free_port()
    document["http_options"] = {"host": "127.0.0.1", "port": port}
    config = tmp_path / "serve-config.yaml"
    config.write_text(yaml.safe_dump(document))
    run("serve", "deploy", "-a", dashboard, str(config))

    def running():
        out = run("serve", "status", "-a", dashboard, check=False)
        return "status: RUNNING" in out and "DEPLOYING" not in out, out

    try:
        wait_until(running, "the application to run", 240)
        name = document["applications"][0]["args"]["served_model_name"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
        r = client.completions.create(model=name, prompt="pinned", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        # Each pool's engine replica holds one unit of the resource only its node has,
        # and each node's one CPU is taken by its own pool's engine.
        status = run("ray", "status", f"--address={address}")
        for pool in POOLS:
            assert f"1.0/1000.0 tandem_pool_{pool}" in status, status
        assert f"{len(POOLS)}.0/{len(POOLS)}.0 CPU" in status, status
    finally:
        run("serve", "shutdown", "-a", dashboard, "-y", check=False)
