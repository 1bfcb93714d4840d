"""The Helm chart deploy/helm/tandem, rendered and linted by the real Helm engine."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from deploy_support import (
    CHART,
    CONFIG,
    DASHBOARD,
    VALUES_FILES,
    helm,
    load_config,
    one,
    pod_groups,
    ray_container,
    render,
    render_file,
    render_objects,
    serve_config,
    validate_rayservice,
    values_file,
)

GPU = "nvidia.com/gpu"


def lint_values(name: str) -> dict | None:
    return values_file(name) or None


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_helm_lint_strict_passes(name):
    report = helm.lint(str(CHART), lint_values(name), strict=True)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_rendered_rayservice_is_valid_for_kuberay(name):
    objects = render_file(name)
    validate_rayservice(one(objects, "RayService"))


def test_rayservice_with_every_option_on_is_valid():
    objects = render_file(
        "gpu-pd",
        {
            "autoscaling": {"enabled": True},
            "model": {"type": "hostPath", "hostPath": {"path": "/mnt/models"}},
            "monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}},
            "service": {"type": "NodePort", "nodePort": 30080},
            "rayService": {"deploymentUnhealthySecondThreshold": 900},
            "common": {
                "env": [{"name": "RAY_LOG_TO_STDERR", "value": "1"}],
                "podAnnotations": {"team": "serving"},
            },
            "workerGroups": {"decode": {"minReplicas": 0, "maxReplicas": 4}},
            "serveConfig": {
                "application": {
                    "args": {"max_waiting": 128, "engine": {"gpu_memory_utilization": 0.85}}
                }
            },
        },
    )
    rayservice = one(objects, "RayService")
    validate_rayservice(rayservice)
    spec = rayservice["spec"]
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["max_waiting"] == 128 and args["engine"]["gpu_memory_utilization"] == 0.85
    assert spec["deploymentUnhealthySecondThreshold"] == 900
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    decode = pod_groups(rayservice)["decode"]
    assert (decode["minReplicas"], decode["replicas"], decode["maxReplicas"]) == (0, 1, 4)
    for group in pod_groups(rayservice).values():
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["model"]["hostPath"] == {"path": "/mnt/models", "type": "Directory"}
        assert {"name": "RAY_LOG_TO_STDERR", "value": "1"} in ray_container(group)["env"]
        assert group["template"]["metadata"]["annotations"] == {"team": "serving"}
    service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "tandem-api"
    )
    assert service["spec"]["ports"][0]["nodePort"] == 30080


@pytest.mark.parametrize("name", ["default", "cpu"])
def test_serve_config_is_config_yaml(name):
    """serveConfigV2 is config.yaml plus, for pools pinned to their own worker group,
    the `deployments` entries that pin them (test_deploy_pinning.py checks those)."""
    document = serve_config(one(render_file(name), "RayService"))
    pinning = document["applications"][0].pop("deployments", None)
    assert document == load_config()
    if name == "cpu":   # every pool runs on the head: nothing to pin
        assert pinning is None
    else:
        mode = document["applications"][0]["args"]["mode"]
        assert [d["name"] for d in pinning] == {"pd": ["Prefill", "Decode"],
                                                 "colocated": ["Colocated"]}[mode]


def test_serve_config_is_exactly_config_yaml_without_pool_resources():
    rayservice = one(render_file("default", {"poolPinning": {"resourcePrefix": ""}}), "RayService")
    assert serve_config(rayservice) == load_config()


def test_values_serve_config_mirrors_config_yaml():
    """values.yaml's serveConfig is config.yaml with applications[0] as `application`."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["serveConfig"]
    config = load_config()
    assert len(config["applications"]) == 1, "the chart deploys exactly one application"
    expected = {k: v for k, v in config.items() if k != "applications"}
    expected["application"] = config["applications"][0]
    assert values == expected, f"serveConfig in values.yaml drifted from {CONFIG}"


def test_import_path_and_app_settings():
    args = serve_config(one(render_file("default"), "RayService"))["applications"][0]
    assert args["import_path"] == "cluster.app:build_app"
    settings = args["args"]
    assert {"model", "served_model_name", "mode", "engine", "pools", "slo"} <= set(settings)
    assert {
        "device", "dtype", "block_size", "max_num_seqs", "max_num_batched_tokens",
        "max_model_len", "enable_prefix_caching", "enable_chunked_prefill",
    } <= set(settings["engine"])  # fmt: skip
    for pool in ("colocated", "prefill", "decode"):
        assert set(settings["pools"][pool]) == {"replicas", "num_cpus", "num_gpus"}
    assert set(settings["slo"]) == {"ttft_ms", "itl_ms"}


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_ray_start_params_are_strings(name):
    rayservice = one(render_file(name), "RayService")
    for group in pod_groups(rayservice).values():
        params = group["rayStartParams"]
        assert params, "every group passes at least the metrics port"
        assert all(isinstance(v, str) for v in params.values()), params
        assert params["metrics-export-port"] == "8080"


def test_large_integer_ray_start_param_keeps_its_digits():
    rayservice = one(
        render_file("default", {"head": {"rayStartParams": {"object-store-memory": 10000000000}}}),
        "RayService",
    )
    assert pod_groups(rayservice)["head"]["rayStartParams"]["object-store-memory"] == "10000000000"


def test_default_renders_head_and_prefill_decode_groups_on_cpu():
    """Mode pd is the default, as in config.yaml and `tandem serve`."""
    objects = render_file("default")
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "RayService", "Service"]
    rayservice = one(objects, "RayService")
    validate_rayservice(rayservice)
    groups = pod_groups(rayservice)
    assert sorted(groups) == ["decode", "head", "prefill"]
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    for name in ("prefill", "decode"):
        assert groups[name]["labels"] == {"tandem.io/pool": name}
        assert "num-gpus" not in groups[name]["rayStartParams"]
    assert serve_config(rayservice)["applications"][0]["args"]["mode"] == "pd"
    assert GPU not in json.dumps(rayservice)
    assert ray_container(groups["head"])["image"] == "tandem:0.1.0"


def test_mode_colocated_on_defaults_switches_to_the_colocated_group():
    rayservice = one(
        render_file("default", {"serveConfig": {"application": {"args": {"mode": "colocated"}}}}),
        "RayService",
    )
    validate_rayservice(rayservice)
    groups = pod_groups(rayservice)
    assert list(groups) == ["head", "colocated"]
    assert groups["colocated"]["labels"] == {"tandem.io/pool": "colocated"}
    assert serve_config(rayservice)["applications"][0]["args"]["mode"] == "colocated"


def test_gpu_pd_puts_gpus_on_prefill_and_decode_groups():
    values = values_file("gpu-pd")
    objects = render_file("gpu-pd")
    rayservice = one(objects, "RayService")
    groups = pod_groups(rayservice)
    assert sorted(groups) == ["decode", "head", "prefill"]

    head = ray_container(groups["head"])
    assert GPU not in head["resources"].get("limits", {})
    assert GPU not in head["resources"].get("requests", {})
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    assert "num-gpus" not in groups["head"]["rayStartParams"]

    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["mode"] == "pd"
    assert args["engine"]["device"] == "cuda"
    # The values file changes only what differs; the rest still comes from config.yaml.
    config_args = load_config()["applications"][0]["args"]
    assert args["engine"]["block_size"] == config_args["engine"]["block_size"]
    assert args["pools"]["colocated"] == config_args["pools"]["colocated"]

    gpus_available = 0
    for name in ("prefill", "decode"):
        want = values["workerGroups"][name]["gpus"]
        assert want > 0
        group = groups[name]
        resources = ray_container(group)["resources"]
        assert resources["limits"][GPU] == want
        assert resources["requests"][GPU] == want
        assert group["rayStartParams"]["num-gpus"] == str(want)
        spec = group["template"]["spec"]
        # The values file's node selector, plus the pool's own node label.
        assert spec["nodeSelector"] == {**values["workerGroups"][name]["nodeSelector"],
                                        "tandem.io/pool": name}
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        gpus_available += want * group["replicas"]
        # Each pool's own group can hold that pool's engines.
        pool = args["pools"][name]
        assert want * group["replicas"] >= pool["replicas"] * pool["num_gpus"]
    needed = sum(
        args["pools"][p]["replicas"] * args["pools"][p]["num_gpus"] for p in ("prefill", "decode")
    )
    assert needed > 0 and gpus_available >= needed

    # The checkpoint comes from the PVC, mounted in every pod where args.model points.
    mount = yaml.safe_load((CHART / "values.yaml").read_text())["model"]["mountPath"]
    assert "mountPath" not in values["model"]
    assert args["model"].startswith(mount + "/")
    for group in groups.values():
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "tandem-models"
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["model"]["mountPath"] == mount and mounts["model"]["readOnly"] is True
    assert one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_cpu_values_run_everything_on_the_head_without_gpus():
    objects = render_file("cpu")
    rayservice = one(objects, "RayService")
    assert GPU not in json.dumps(objects)
    groups = pod_groups(rayservice)
    assert list(groups) == ["head"]
    assert "workerGroupSpecs" not in rayservice["spec"]["rayClusterConfig"]
    cpus = float(groups["head"]["rayStartParams"]["num-cpus"])
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["engine"]["device"] == "cpu" and args["model"] == "default"
    assert all(pool["num_gpus"] == 0 for pool in args["pools"].values())
    # Enough CPUs on the head for either mode's pools.
    for pools in (["colocated"], ["prefill", "decode"]):
        assert cpus >= sum(
            args["pools"][p]["replicas"] * args["pools"][p]["num_cpus"] for p in pools
        )


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_every_ray_pod_has_shm_probes_and_metrics_port(name):
    rayservice = one(render_file(name), "RayService")
    http_port = serve_config(rayservice)["http_options"]["port"]
    for group_name, group in pod_groups(rayservice).items():
        spec = group["template"]["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec["volumes"]}
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, group_name
        assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[shm[0]["name"]]["emptyDir"]["sizeLimit"]
        for probe in ("livenessProbe", "readinessProbe"):
            action = container[probe]["httpGet"]
            assert action == {"path": "/api/healthz", "port": 52365}, (group_name, probe)
            assert container[probe]["periodSeconds"] > 0
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 8080
        if group_name == "head":
            assert ports["serve"] == http_port
            assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
        else:
            assert "serve" not in ports, "HeadOnly: workers run no Serve proxy"


def test_api_service_reaches_head_proxy():
    objects = render_file("default")
    service = one(objects, "Service")
    assert service["metadata"]["name"] == "tandem-api"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "serve", "protocol": "TCP"}
    ]
    selector = service["spec"]["selector"]
    assert selector["ray.io/serve"] == "true"
    assert selector["ray.io/node-type"] == "head"
    head = pod_groups(one(objects, "RayService"))["head"]
    pod_labels = head["template"]["metadata"]["labels"]
    # KubeRay adds ray.io/serve and ray.io/node-type to the pod; the rest comes from us.
    own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
    assert own and own.items() <= pod_labels.items()


def test_every_node_proxy_makes_workers_serve():
    rayservice_objects = render_file("gpu-pd", {"serveConfig": {"proxy_location": "EveryNode"}})
    rayservice = one(rayservice_objects, "RayService")
    validate_rayservice(rayservice)
    service = one(rayservice_objects, "Service")
    assert "ray.io/node-type" not in service["spec"]["selector"]
    for name, group in pod_groups(rayservice).items():
        container = ray_container(group)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000
        if name != "head":
            assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
            assert container["livenessProbe"]["httpGet"]["path"] == "/api/healthz"


def test_monitors_are_off_by_default_and_scrape_the_metrics_port():
    assert not [o for o in render_file("default") if o["kind"] in ("PodMonitor", "ServiceMonitor")]
    objects = render_file(
        "default",
        {
            "monitoring": {
                "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "serviceMonitor": {"enabled": True},
            }
        },
    )
    pod_labels = [
        g["template"]["metadata"]["labels"] for g in pod_groups(one(objects, "RayService")).values()
    ]
    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert pod_monitor["metadata"]["labels"]["release"] == "prom"
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    match = pod_monitor["spec"]["selector"]["matchLabels"]
    own = {k: v for k, v in match.items() if not k.startswith("ray.io/")}
    assert all(own.items() <= labels.items() for labels in pod_labels)

    service_monitor = one(objects, "ServiceMonitor")
    metrics_service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "tandem-metrics"
    )
    assert metrics_service["spec"]["clusterIP"] == "None"
    assert metrics_service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert metrics_service["spec"]["ports"][0]["port"] == 8080
    wanted = service_monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= metrics_service["metadata"]["labels"].items()
    assert [e["port"] for e in service_monitor["spec"]["endpoints"]] == ["metrics"]


def test_dashboards_configmap_carries_the_grafana_label_and_json():
    configmap = one(render_file("default"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(configmap["data"]) == {DASHBOARD.name}
    assert json.loads(configmap["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
    assert not [
        o
        for o in render_file("default", {"dashboards": {"enabled": False}})
        if o["kind"] == "ConfigMap"
    ]


def test_unplaceable_gpu_pools_fail_the_render():
    values = yaml.safe_load((CHART / "values-gpu-pd.yaml").read_text())
    values["serveConfig"]["application"]["args"]["pools"]["decode"]["replicas"] = 3
    with pytest.raises(helm.HelmError, match=r"asks for 4 GPUs .* have 3"):
        render(values)


def test_unplaceable_cpu_pools_fail_the_render():
    values = yaml.safe_load((CHART / "values-cpu.yaml").read_text())
    values["serveConfig"] = {
        "application": {"args": {"mode": "pd", "pools": {"prefill": {"num_cpus": 8}}}}
    }
    with pytest.raises(helm.HelmError, match=r"asks for 9 CPUs .* advertise 4"):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serveConfig": {"application": {"args": {"engine": {"max_num_seq": 8}}}}}, "max_num_seq"),
        ({"serveConfig": {"application": {"args": {"mode": "disagg"}}}}, "mode"),
        ({"workerGroups": {"decode": {"gpus": -1}}}, "gpus"),
        ({"model": {"type": "s3"}}, "type"),
        ({"workerGroups": {"colocated": {"enabled": "yes"}}}, "enabled"),
        ({"serveConfig": {"applications": []}}, "applications"),
    ],
)
def test_values_schema_rejects_bad_values(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 3]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": {"type": "pvc"}}, "set model.pvc.claimName"),
        ({"head": {"rayStartParams": {"labels": "a=b"}}}, "KubeRay rejects --labels"),
        (
            {
                "workerGroups": {"decode": {"rayStartParams": {"labels": "a=b"}}},
                "serveConfig": {"application": {"args": {"mode": "pd"}}},
            },
            "KubeRay rejects --labels",
        ),
        (
            {"workerGroups": {"decode": {"replicas": 2, "maxReplicas": 1}}},
            "replicas .2. <= maxReplicas .1.",
        ),
    ],
)
def test_template_checks_fail_with_a_clear_message(values, message):
    # helm lint only logs a template's `fail`; the render (install, template) stops.
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_long_release_names_fit_kuberay_limits():
    release = "a-very-long-release-name-for-a-production-serving-stack"
    objects = render_objects(None, release=release)
    rayservice = one(objects, "RayService")
    assert len(rayservice["metadata"]["name"]) <= 47
    validate_rayservice(rayservice)


def test_notes_tell_how_to_reach_the_api_and_dashboards():
    notes = render()["tandem/templates/NOTES.txt"]
    assert "kubectl -n serving port-forward svc/tandem-api 8000:8000" in notes
    assert "curl http://localhost:8000/v1/models" in notes
    assert '"model": "tandem-default"' in notes
    assert "svc/tandem-head-svc 8265:8265" in notes
    assert "tandem-dashboards" in notes and "grafana_dashboard=1" in notes
    monitored = render({"monitoring": {"podMonitor": {"enabled": True}}})[
        "tandem/templates/NOTES.txt"
    ]
    assert "PodMonitor tandem scrapes port `metrics`" in monitored


def test_notes_state_the_node_pools_mode_pd_needs():
    notes = render()["tandem/templates/NOTES.txt"]
    assert "kubectl label node <node> tandem.io/pool=prefill" in notes
    assert "kubectl label node <node> tandem.io/pool=decode" in notes
    assert "- prefill: 1 pod(s) of 2 CPU, 8Gi memory, 0 GPU(s), for 1 engine(s) of 1 CPU / 0 GPU" in notes
    assert "- decode: 1 pod(s) of 2 CPU, 8Gi memory, 0 GPU(s), for 1 engine(s) of 1 CPU / 0 GPU" in notes
    assert "NetworkPolicy" in notes
    gpu = render(values_file("gpu-pd"))["tandem/templates/NOTES.txt"]
    assert "- decode: 1 pod(s) of" in gpu and "2 GPU(s), for 2 engine(s) of 4 CPU / 1 GPU" in gpu
    on_head = render(values_file("cpu"))["tandem/templates/NOTES.txt"]
    assert "- prefill: no worker group of its own" in on_head
    colocated = render({"serveConfig": {"application": {"args": {"mode": "colocated"}}}})
    assert "Mode pd" not in colocated["tandem/templates/NOTES.txt"]


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "tandem"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] and chart["description"] and chart["kubeVersion"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == "tandem" and values["image"]["tag"] == ""
    assert (CHART / "templates" / "NOTES.txt").exists()
    assert (CHART / "README.md").exists()


_KEY = re.compile(r"^(\s*)(?:- )?[\"']?[\w./-]+[\"']?:(\s|$)")


@pytest.mark.parametrize("name", ["values.yaml", "values-cpu.yaml", "values-gpu-pd.yaml"])
def test_values_files_document_every_key(name):
    """Each key of a values file has a comment on the line above it."""
    lines = (CHART / name).read_text().splitlines()
    undocumented = []
    item_indent = None  # indentation of the keys of the list item being read
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            continue
        if item_indent is not None and indent < item_indent:
            item_indent = None
        if stripped.startswith("- "):
            item_indent = indent + 2
            continue
        if item_indent is not None or not _KEY.match(line):
            continue
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("#"):
            undocumented.append(f"{name}:{i + 1}: {line.strip()}")
    assert undocumented == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # A misspelt field, which the API server would silently drop.
        (
            [
                "spec",
                "rayClusterConfig",
                "headGroupSpec",
                "template",
                "spec",
                "containers",
                0,
                "imagePullPolicyy",
            ],
            "Always",
        ),
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replica"], 2),
        # rayStartParams is map[string]string.
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 0),
        # serveConfigV2 is a string, not a nested object.
        (["spec", "serveConfigV2"], {"applications": []}),
        # minReplicas above replicas (KubeRay's own validation).
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"], 5),
    ],
)
def test_validation_catches_broken_rayservices(path, value):
    """The CRD check is strict enough to catch the mistakes it is there for."""
    rayservice = one(render_file("default"), "RayService")
    validate_rayservice(rayservice)
    node = rayservice
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(AssertionError):
        validate_rayservice(rayservice)


def _args_schema() -> dict:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return schema["properties"]["serveConfig"]["properties"]["application"]["properties"]["args"]


def test_values_schema_knows_every_app_setting():
    """The schema accepts exactly the settings cluster/settings.py and the engine accept."""
    from dataclasses import fields

    from cluster.request_metrics import SLO
    from cluster.settings import AppSettings, PoolSettings
    from engine.config import EngineConfig

    args = _args_schema()
    assert args["additionalProperties"] is False
    assert set(args["properties"]) == {f.name for f in fields(AppSettings)}
    engine = args["properties"]["engine"]
    assert set(engine["properties"]) == {f.name for f in fields(EngineConfig)} - {"model"}
    for pool in args["properties"]["pools"]["properties"].values():
        assert set(pool["properties"]) == {f.name for f in fields(PoolSettings)}
    assert set(args["properties"]["slo"]["properties"]) == {f.name for f in fields(SLO)}


def test_values_schema_knows_the_kv_transfer_settings_and_connectors():
    from cluster.settings import KV_TRANSFER_KEYS
    from disagg.connector import CONNECTORS

    kv = _args_schema()["properties"]["kv_transfer"]["properties"]
    assert set(kv) == set(KV_TRANSFER_KEYS) and kv["kv_connector"]["enum"] == sorted(CONNECTORS)


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_app_accepts_the_rendered_settings(name):
    """cluster.settings.parse_settings (what build_app runs) takes the deployed args."""
    from cluster.settings import parse_settings

    args = serve_config(one(render_file(name), "RayService"))["applications"][0]["args"]
    assert args["mode"] in _args_schema()["properties"]["mode"]["enum"]
    # Mode is the chart's to choose (colocated or pd); the rest must parse as it is.
    settings = parse_settings({**args, "mode": "colocated"})
    assert settings.model == args["model"]
    assert settings.pool("colocated").replicas == args["pools"]["colocated"]["replicas"]
    if args["engine"]["device"] == "cpu":
        config = settings.engine_config()
        assert config.max_num_seqs == args["engine"]["max_num_seqs"]


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_serve_config_is_valid_for_ray_serve(name):
    """Ray's own schema for `serve deploy` documents accepts every rendered serveConfigV2."""
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    document = serve_config(one(render_file(name), "RayService"))
    deploy = schema.ServeDeploySchema.model_validate(document)
    assert [app.import_path for app in deploy.applications] == ["cluster.app:build_app"]
    assert deploy.http_options.port == 8000


def test_vendored_schemas_match_shared():
    from deploy_support import SCHEMAS, SHARED_SCHEMAS
    names = sorted(p.name for p in SCHEMAS.glob("*.yaml"))
    assert names == ["kuberay-v1.7-ray.io_rayclusters.yaml", "kuberay-v1.7-ray.io_rayservices.yaml"]
    if SHARED_SCHEMAS.is_dir():
        for name in names:
            assert (SCHEMAS / name).read_bytes() == (SHARED_SCHEMAS / name).read_bytes(), name
