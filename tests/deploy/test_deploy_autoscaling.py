"""The chart with autoscaled pools, rendered by the real Helm engine and checked against
the KubeRay CRD schema: KubeRay's autoscaler turns on when a pool the mode uses has
`autoscaling`, each such pool's worker group gets its pod bounds from the pool's
replica bounds and resources, and the schema takes exactly the app's autoscaling keys."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from deploy_support import (
    CHART,
    helm,
    one,
    pod_groups,
    render,
    render_file,
    serve_config,
    validate_rayservice,
)


def scaled(pools: dict, extra: dict | None = None) -> dict:
    return {"serveConfig": {"application": {"args": {"pools": pools}}}, **(extra or {})}


def rayservice(name: str, values: dict) -> dict:
    obj = one(render_file(name, values), "RayService")
    validate_rayservice(obj)
    return obj


def bounds(obj: dict, group: str) -> tuple[int, int, int]:
    g = pod_groups(obj)[group]
    return g["minReplicas"], g["replicas"], g["maxReplicas"]


def test_fixed_pools_leave_the_autoscaler_off_and_groups_fixed():
    obj = rayservice("gpu-pd", {})
    assert "enableInTreeAutoscaling" not in obj["spec"]["rayClusterConfig"]
    assert all(len(set(bounds(obj, g))) == 1 for g in ("prefill", "decode"))


def test_autoscaled_gpu_pools_turn_kuberay_autoscaling_on_with_bounds_from_the_pools():
    # values-gpu-pd: one GPU per replica, one GPU per pod; decode's replicas go 2 GPUs each.
    obj = rayservice("gpu-pd", scaled({
        "prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 6, "upscale_delay_s": 20}},
        "decode": {"num_gpus": 2, "autoscaling": {"min_replicas": 2, "max_replicas": 5}},
    }, {"workerGroups": {"decode": {"gpus": 2, "replicas": 1}}}))
    cluster = obj["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"] == {"idleTimeoutSeconds": 60, "upscalingMode": "Default"}
    assert bounds(obj, "prefill") == (1, 1, 6)
    assert bounds(obj, "decode") == (2, 2, 5)        # pods: replicas x 2 GPUs / 2 GPUs a pod; 1 raised to 2
    pools = serve_config(obj)["applications"][0]["args"]["pools"]
    assert pools["prefill"]["autoscaling"] == {"min_replicas": 1, "max_replicas": 6, "upscale_delay_s": 20}
    from cluster.settings import parse_settings
    settings = parse_settings(serve_config(obj)["applications"][0]["args"])
    assert settings.pool("decode").autoscaling.max_replicas == 5


def test_cpu_pools_take_pod_bounds_from_cpus_and_explicit_bounds_win():
    # The chart's defaults: mode pd, replicas of 1 CPU, prefill and decode pods of 2 CPUs.
    obj = rayservice("default", scaled({"prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 9}},
                                        "decode": {"autoscaling": {"min_replicas": 1, "max_replicas": 8}}},
                                       {"workerGroups": {"decode": {"maxReplicas": 4}}}))
    assert obj["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert bounds(obj, "prefill") == (1, 1, 5)                 # ceil(9 replicas x 1 CPU / 2 CPUs a pod)
    assert bounds(obj, "decode")[2] == 4                        # the group's own maxReplicas


def test_a_pool_of_another_mode_does_not_turn_the_autoscaler_on():
    obj = rayservice("gpu-pd", scaled({"colocated": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}}))
    assert "enableInTreeAutoscaling" not in obj["spec"]["rayClusterConfig"]


def test_a_pinned_pool_whose_max_replicas_cannot_fit_fails_the_render():
    values = scaled({"prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 6}}},
                    {"workerGroups": {"prefill": {"maxReplicas": 2}}})
    with pytest.raises(helm.HelmError, match=r"pool prefill asks for 6 GPUs .* has 2"):
        render_file("gpu-pd", values)


def test_schema_takes_exactly_the_apps_autoscaling_keys_and_refuses_bad_ones():
    from cluster.autoscaling import AutoscalingSettings

    schema = json.loads((CHART / "values.schema.json").read_text())
    block = schema["definitions"]["poolAutoscaling"]
    assert set(block["properties"]) == {f.name for f in fields(AutoscalingSettings)}
    for bad, message in (({"min_replicas": 0}, "min_replicas"), ({"max_replica": 3}, "max_replica"),
                         ({"ttft_slo_fraction": 2}, "ttft_slo_fraction")):
        with pytest.raises(helm.HelmError, match=message):
            render(scaled({"prefill": {"autoscaling": bad}}))
    with pytest.raises(helm.HelmError, match="autoscaling"):
        render(scaled({"router": {"autoscaling": {"max_replicas": 2}}}))
