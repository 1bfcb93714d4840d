"""Expert-parallel pools in the chart: the same `parallel` and `eplb` keys as config.yaml
(schema-checked), each EP replica's placement group in serveConfigV2 with the pool
resource in every bundle (pinning keeps working), worker groups sized for ranks x GPUs,
and a RayService valid for KubeRay's CRD schema. Real Helm (helm-python-sdk)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import yaml
from deploy_support import (
    CHART,
    helm,
    one,
    render,
    render_objects,
    serve_config,
    validate_rayservice,
)

EP_DECODE = {"data_parallel_size": 2, "enable_expert_parallel": True, "enable_eplb": True,
             "placement_strategy": "STRICT_PACK"}


def gpu_pd_with_ep_decode(**decode) -> dict:
    """values-gpu-pd.yaml with one decode replica of 2 EP ranks, 1 GPU each."""
    values = yaml.safe_load((CHART / "values-gpu-pd.yaml").read_text())
    args = values["serveConfig"]["application"]["args"]
    args["pools"]["decode"] = {"replicas": 1, "num_cpus": 2, "num_gpus": 1, "parallel": dict(EP_DECODE), **decode}
    args["eplb"] = {"step_interval": 32, "num_redundant_experts": 8}
    return values


def decode_entry(rayservice: dict) -> dict:
    document = serve_config(rayservice)["applications"][0]
    return next(d for d in document["deployments"] if d["name"] == "Decode")


def test_an_ep_pool_renders_its_replica_placement_group_and_is_valid_for_kuberay():
    rayservice = one(render_objects(gpu_pd_with_ep_decode()), "RayService")
    validate_rayservice(rayservice)
    pin = "tandem_pool_decode"
    entry = decode_entry(rayservice)
    assert entry["ray_actor_options"] == {"num_cpus": 0.1, "num_gpus": 0, "resources": {pin: 1}}
    assert entry["placement_group_bundles"] == [{"CPU": 0.1, pin: 1}] + [{"CPU": 2, "GPU": 1, pin: 1}] * 2
    assert entry["placement_group_strategy"] == "STRICT_PACK"
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["pools"]["decode"]["parallel"] == EP_DECODE and args["eplb"]["num_redundant_experts"] == 8


def test_the_chart_places_an_ep_replica_as_the_app_does():
    """The app's own bundles (what Serve uses without the chart) are the chart's without
    the pool resource; Ray Serve's config schema takes the rendered document."""
    schema = pytest.importorskip("ray.serve.schema")
    from cluster.settings import parse_settings

    rayservice = one(render_objects(gpu_pd_with_ep_decode()), "RayService")
    document = serve_config(rayservice)
    schema.ServeDeploySchema.model_validate(document)
    pool = parse_settings(document["applications"][0]["args"]).pool("decode")
    entry = decode_entry(rayservice)
    assert [{k: v for k, v in b.items() if k != "tandem_pool_decode"} for b in entry["placement_group_bundles"]] \
        == pool.placement_group_bundles()
    assert {k: v for k, v in entry["ray_actor_options"].items() if k != "resources"} == pool.actor_options()


def test_worker_groups_must_hold_ranks_times_gpus():
    values = gpu_pd_with_ep_decode(replicas=2)    # decode: 2 replicas x 2 ranks x 1 GPU, + 1 prefill GPU
    with pytest.raises(helm.HelmError, match=r"mode pd asks for 5 GPUs .*data_parallel_size.* have 3"):
        render(values)
    values["workerGroups"]["prefill"]["gpus"] = 3         # enough in all, but not on decode's own group
    with pytest.raises(helm.HelmError, match=r"pool decode asks for 4 GPUs .*data_parallel_size.* has 2"):
        render(values)
    values["workerGroups"]["decode"]["gpus"] = 4
    validate_rayservice(one(render_objects(values), "RayService"))


@pytest.mark.parametrize("parallel, eplb, message", [
    ({"data_parallel_size": 0}, {}, "data_parallel_size"),
    ({"ep_dispatch": "fast"}, {}, "ep_dispatch"),
    ({"tensor_parallel_size": 2}, {}, "tensor_parallel_size"),
    ({"placement_strategy": "NEAR"}, {}, "placement_strategy"),
    ({}, {"window": 8}, "window"),
    ({}, {"num_redundant_experts": -1}, "num_redundant_experts"),
])
def test_values_schema_rejects_bad_ep_values(parallel, eplb, message):
    values = gpu_pd_with_ep_decode()
    values["serveConfig"]["application"]["args"]["pools"]["decode"]["parallel"].update(parallel)
    values["serveConfig"]["application"]["args"]["eplb"].update(eplb)
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_values_schema_knows_every_parallel_and_eplb_setting():
    import json

    from cluster.parallel_settings import PoolParallel
    from eplb.elastic import EplbConfig

    args = json.loads((CHART / "values.schema.json").read_text())["properties"]["serveConfig"]["properties"][
        "application"]["properties"]["args"]["properties"]
    for pool in args["pools"]["properties"].values():
        assert set(pool["properties"]["parallel"]["properties"]) == {f.name for f in fields(PoolParallel)}
    assert set(args["eplb"]["properties"]) == {f.name for f in fields(EplbConfig)} | {"num_redundant_experts"}
