"""The chart's pool pinning on a real local Ray cluster shaped like the chart's: a head
with num-cpus 0, and a node per worker group started the way KubeRay starts it (the
group's rendered rayStartParams as `ray start --key=value` flags through `bash -lc`).
`serve deploy` of the chart's serveConfigV2 must then run the app with each pool's engine
replica holding one unit of the resource that only its own group's node advertises.

The chart's default mode, pd: a prefill node and a decode node, one engine each, the
decode engine expert-parallel (2 ranks with EPLB in the replica's placement group, whose
every bundle asks for the pool resource, so the ranks stay on the decode node too). The
cluster is the test's own (tests/ray_cluster.py): temp dir, free ports (the chart's
per-pod ports are replaced, these nodes share one machine), token authentication."""

from __future__ import annotations

import re

import openai
import pytest
import yaml

from deploy_support import one, pod_groups, render_file
from tests.ray_cluster import BIN, NODE_PORT_FLAGS, RayHead, free_port, node_port_flags, wait_until

MODE, POOLS = "pd", ("prefill", "decode")
# 0.1 CPU for the replica and 0.4 per rank: all of it fits the decode node's one CPU.
EP_DECODE = {"num_cpus": 0.4, "parallel": {"data_parallel_size": 2, "enable_expert_parallel": True,
                                           "enable_eplb": True}}


def without_port_flags(params: dict[str, str]) -> dict[str, str]:
    """A group's rayStartParams less the per-node ports, which the test picks free."""
    return {k: v for k, v in params.items() if k not in NODE_PORT_FLAGS}


def ray_start_command(params: dict[str, str], address: str) -> str:
    """The `ray start` line KubeRay builds from a group's rayStartParams (`--key=value`,
    values verbatim, run by bash), with per-node ports made free."""
    flags = " ".join(f"--{key}={value}" for key, value in without_port_flags(params).items())
    return f"{BIN / 'ray'} start --block --address={address} --num-cpus=1 {' '.join(node_port_flags())} {flags}"


@pytest.fixture(scope="module")
def cluster():
    """(head, rayservice): a head and one node per pool's group."""
    rayservice = one(render_file("default", {"serveConfig": {"application": {"args": {"pools": {
        "decode": EP_DECODE}}}}}), "RayService")
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["mode"] == MODE
    groups = pod_groups(rayservice)
    assert sorted(groups) == sorted(["head", *POOLS])
    head_params = without_port_flags(groups["head"]["rayStartParams"])
    with RayHead(num_cpus=int(head_params.pop("num-cpus")), params=head_params) as head:
        def nodes(count: int):
            def check():
                out = head.ray("ray", "status", f"--address={head.address}", check=False)
                return len(re.findall(r"^\s*1 node_", out, re.M)) == count, out
            return check
        for started, pool in enumerate(POOLS, start=2):   # one at a time: two cores
            command = ["bash", "-lc", ray_start_command(groups[pool]["rayStartParams"], head.address)]
            head.add_node(command, pool)
            wait_until(nodes(started), f"the {pool} group's node", 150)
        yield head, rayservice


def test_serve_deploy_places_the_pool_on_its_group(cluster, tmp_path):
    head, rayservice = cluster
    status = head.ray("ray", "status", f"--address={head.address}")
    for pool in POOLS:   # each node advertises its pool's resource, parsed from the chart's string
        assert f"0.0/1000.0 tandem_pool_{pool}" in status, status
    document = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    port = free_port()
    document["http_options"] = {"host": "127.0.0.1", "port": port}
    config = tmp_path / "serve-config.yaml"
    config.write_text(yaml.safe_dump(document))
    head.ray("serve", "deploy", "-a", head.dashboard, str(config))

    def running():
        out = head.ray("serve", "status", "-a", head.dashboard, check=False)
        return "status: RUNNING" in out and "DEPLOYING" not in out, out

    try:
        wait_until(running, "the application to run", 300)
        name = document["applications"][0]["args"]["served_model_name"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
        r = client.completions.create(model=name, prompt="pinned", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        # The prefill replica holds one unit of the resource only its node has; the EP
        # decode replica's placement group holds three (its bundle and one per rank), and
        # each node's CPU is taken by its own pool's engine.
        status = head.ray("ray", "status", f"--address={head.address}")
        assert "1.0/1000.0 tandem_pool_prefill" in status, status
        assert "tandem_pool_decode (1.0 used of 3.0 reserved in placement groups)" in status, status
        assert "1.9/2.0 CPU (0.9 used of 0.9 reserved in placement groups)" in status, status
    finally:
        head.ray("serve", "shutdown", "-a", head.dashboard, "-y", check=False)
