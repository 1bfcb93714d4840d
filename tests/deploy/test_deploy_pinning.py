"""Pool pinning in the chart: each pool's Serve replicas run only on its own worker group
(a Ray custom resource the group advertises and the pool's deployment asks for), and each
worker group's pods only on nodes labelled for the pool."""

from __future__ import annotations

import pytest
import yaml

from deploy_support import (
    CHART,
    helm,
    one,
    pod_groups,
    render,
    render_file,
    render_objects,
    serve_config,
    validate_rayservice,
    values_file,
)

LABEL = "tandem.io/pool"


def ray_parse_group_resources(group: dict) -> dict:
    """The custom resources of a worker group as Ray's KubeRay autoscaler reads them from
    rayStartParams (its own parser, so the string's format is the one it expects)."""
    autoscaling_config = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    return autoscaling_config._get_custom_resources({}, group["rayStartParams"], group["groupName"])


def pinning(rayservice: dict) -> dict[str, dict]:
    """Deployment name -> ray_actor_options of serveConfigV2's `deployments` entries."""
    entries = serve_config(rayservice)["applications"][0].get("deployments", [])
    return {d["name"]: d["ray_actor_options"] for d in entries}


@pytest.mark.parametrize("name", ["default", "gpu-pd"])
def test_each_pool_runs_on_its_own_group_and_nodes(name):
    rayservice = one(render_file(name), "RayService")
    validate_rayservice(rayservice)
    args = serve_config(rayservice)["applications"][0]["args"]
    pools = ["prefill", "decode"] if args["mode"] == "pd" else ["colocated"]
    deployments = yaml.safe_load((CHART / "values.yaml").read_text())["poolPinning"]["deployments"]
    groups = pod_groups(rayservice)
    options = pinning(rayservice)
    assert set(options) == {deployments[p] for p in pools}
    for pool in pools:
        group = groups[pool]
        resource = f"tandem_pool_{pool}"
        # The group advertises its pool's resource, parsed as Ray's autoscaler parses it.
        assert ray_parse_group_resources(group) == {resource: 1000}
        # ...and the pool's replicas each ask for one unit of it, with the pool's CPUs/GPUs.
        assert options[deployments[pool]] == {
            "num_cpus": args["pools"][pool]["num_cpus"],
            "num_gpus": args["pools"][pool]["num_gpus"],
            "resources": {resource: 1},
        }
        # No other group offers it, so Ray can place the pool nowhere else.
        for other, spec in groups.items():
            if other not in ("head", pool):
                assert resource not in ray_parse_group_resources(spec)
        assert "resources" not in groups["head"]["rayStartParams"]
        # Kubernetes side: the group's pods go only to nodes labelled for the pool.
        assert group["template"]["spec"]["nodeSelector"][LABEL] == pool
        assert group["labels"] == {LABEL: pool}   # the Ray node label as well
    assert "nodeSelector" not in groups["head"]["template"]["spec"]


def test_pools_on_the_head_are_not_pinned():
    rayservice = one(render_file("cpu"), "RayService")
    assert "deployments" not in serve_config(rayservice)["applications"][0]
    assert "resources" not in pod_groups(rayservice)["head"]["rayStartParams"]


def test_pinning_can_be_turned_off_on_either_side():
    rayservice = one(render_file("gpu-pd", {"poolPinning": {"resourcePrefix": "", "nodeLabel": ""}}),
                     "RayService")
    validate_rayservice(rayservice)
    assert pinning(rayservice) == {}
    values = values_file("gpu-pd")
    for name in ("prefill", "decode"):
        group = pod_groups(rayservice)[name]
        assert "resources" not in group["rayStartParams"]
        assert group["template"]["spec"]["nodeSelector"] == values["workerGroups"][name]["nodeSelector"]


def test_node_label_and_group_selectors_combine():
    rayservice = one(render_file("gpu-pd", {
        "poolPinning": {"nodeLabel": "example.com/serving-pool"},
        "workerGroups": {"decode": {"nodeSelector": {"example.com/serving-pool": "decode-h200"}}},
    }), "RayService")
    groups = pod_groups(rayservice)
    assert groups["prefill"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H200", "example.com/serving-pool": "prefill"}
    # A group's own entry wins on the same key.
    assert groups["decode"]["template"]["spec"]["nodeSelector"]["example.com/serving-pool"] == "decode-h200"


def test_extra_custom_resources_and_user_deployment_options_are_merged():
    rayservice = one(render_file("gpu-pd", {
        "workerGroups": {"decode": {"rayResources": {"nvlink_domain_a": 8}}},
        "serveConfig": {"application": {"deployments": [
            {"name": "Decode", "max_ongoing_requests": 64,
             "ray_actor_options": {"resources": {"nvlink_domain_a": 1}}},
            {"name": "Router", "num_replicas": 2},
        ]}},
    }), "RayService")
    validate_rayservice(rayservice)
    decode = pod_groups(rayservice)["decode"]
    assert ray_parse_group_resources(decode) == {"tandem_pool_decode": 1000, "nvlink_domain_a": 8}
    entries = {d["name"]: d for d in serve_config(rayservice)["applications"][0]["deployments"]}
    assert list(entries) == ["Decode", "Router", "Prefill"]
    assert entries["Decode"]["max_ongoing_requests"] == 64
    assert entries["Decode"]["ray_actor_options"] == {
        "num_cpus": 4, "num_gpus": 1, "resources": {"tandem_pool_decode": 1, "nvlink_domain_a": 1}}
    assert entries["Router"] == {"name": "Router", "num_replicas": 2}


@pytest.mark.parametrize(("values", "message"), [
    ({"workerGroups": {"decode": {"rayStartParams": {"resources": '"{\\"x\\": 1}"'}}}},
     r"rayStartParams.resources: the chart renders this parameter .*rayResources"),
    ({"poolPinning": {"deployments": {"decode": ""}}}, r"poolPinning.deployments.decode"),
])
def test_conflicting_pinning_values_fail_clearly(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_a_pool_must_fit_its_own_group():
    """The cluster has GPUs enough in total, but the prefill pool does not fit its group."""
    values = yaml.safe_load((CHART / "values-gpu-pd.yaml").read_text())
    values["serveConfig"]["application"]["args"]["pools"]["prefill"]["replicas"] = 2
    values["workerGroups"]["decode"]["gpus"] = 4
    with pytest.raises(helm.HelmError, match=r"pool prefill asks for 2 GPUs .* group prefill has 1"):
        render(values)
    values["poolPinning"] = {"resourcePrefix": ""}   # unpinned, the totals are what count
    validate_rayservice(one(render_objects(values), "RayService"))


def test_schema_rejects_unknown_pinning_keys():
    with pytest.raises(helm.HelmError, match="poolPinning"):
        render({"poolPinning": {"nodeSelector": "x"}})


def test_chart_deployment_names_are_the_apps():
    """The `deployments` entries the chart adds name deployments that cluster.app builds,
    with the num_cpus/num_gpus the app itself gives them (Serve replaces the app's
    ray_actor_options with the config's), for every mode the app accepts."""
    pytest.importorskip("ray.serve")
    from ray.serve._private.build_app import build_app as build_serve_app

    from cluster.app import build_app
    from cluster.settings import MODES

    for mode in MODES:
        rayservice = one(render_file("default", {"serveConfig": {"application": {"args": {"mode": mode}}}}),
                         "RayService")
        document = serve_config(rayservice)["applications"][0]
        built = {d.name: d for d in build_serve_app(build_app(document["args"]), name="tandem").deployments}
        options = pinning(rayservice)
        assert options, mode
        for name, actor_options in options.items():
            assert name in built, f"mode {mode}: the app has no deployment {name} ({sorted(built)})"
            own = built[name].ray_actor_options or {}
            assert {k: v for k, v in actor_options.items() if k != "resources"} == \
                   {k: own.get(k) for k in ("num_cpus", "num_gpus")}, (mode, name)
            assert not (set(own) - {"num_cpus", "num_gpus", "resources"}), \
                f"the chart's override would drop {name}'s own ray_actor_options {own}"


def test_notes_say_to_label_the_pool_nodes():
    notes = render(values_file("gpu-pd"))["tandem/templates/NOTES.txt"]
    assert "kubectl label node <node> tandem.io/pool=prefill" in notes
    assert "kubectl label node <node> tandem.io/pool=decode" in notes
    assert "kubectl label node" not in render(values_file("cpu"))["tandem/templates/NOTES.txt"]
