"""Shared helpers for the deployment tests: the real Helm engine, the KubeRay CRD
schemas, and the checks KubeRay's own validation makes on a RayService.

Helm runs in-process through helm-python-sdk (ctypes bindings to Helm's Go SDK:
`Chart.render` is what `helm template` runs, `lint` what `helm lint` runs).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.serve_args import merge

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tandem"
K8S = REPO / "deploy" / "k8s"
CONFIG = REPO / "config.yaml"
DASHBOARD = CHART / "dashboards" / "tandem-overview.json"
# KubeRay v1.7 CRDs, vendored so CI validates without the project's shared folder;
# test_vendored_schemas_match_shared keeps them equal to ../shared/schemas when present.
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
SCHEMA_FILES = {
    "RayService": "kuberay-v1.7-ray.io_rayservices.yaml",
    "RayCluster": "kuberay-v1.7-ray.io_rayclusters.yaml",
}
VALUES_FILES = {
    "default": None,
    "cpu": "values-cpu.yaml",
    "gpu-pd": "values-gpu-pd.yaml",
}
RELEASE = "tandem"

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk (the Helm engine) is not installed"
)


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@functools.cache
def values_file(name: str) -> dict:
    """The values a values file sets (empty for the chart defaults)."""
    file = VALUES_FILES[name]
    return yaml.safe_load((CHART / file).read_text()) if file else {}


@functools.cache
def _chart():
    return helm.Chart.load(str(CHART))


def render(values: dict | None = None, release: str = RELEASE) -> dict[str, str]:
    """`helm template` of the chart: template path -> rendered text."""
    return _chart().render(values, name=release, namespace="serving")


def render_objects(values: dict | None = None, release: str = RELEASE) -> list[dict]:
    """The Kubernetes objects of a render (NOTES.txt left out)."""
    objects = []
    for path, text in sorted(render(values, release).items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render_file(name: str, extra: dict | None = None) -> list[dict]:
    """Objects rendered from a named values file, plus `extra` values on top."""
    return render_objects(merge(values_file(name), extra or {}) or None)


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def serve_config(rayservice: dict) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a string holding YAML"
    return yaml.safe_load(text)


def pod_groups(rayservice: dict) -> dict[str, dict]:
    """'head' and every worker group name -> its group spec."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    for group in cluster.get("workerGroupSpecs", []):
        groups[group["groupName"]] = group
    return groups


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------------------------
# CRD schema validation


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected where the API server prunes them.

    A structural CRD schema says nothing about unknown fields: the API server drops
    them silently (or rejects them under strict field validation). Plain JSON Schema
    would accept them, so a misspelt field would pass; here every object schema that
    lists its properties, allows no additional ones and does not preserve unknown
    fields gets additionalProperties: false.
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / SCHEMA_FILES[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _nulls(value: Any, path: str = "") -> list[str]:
    if value is None:
        return [path or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nulls(v, f"{path}[{i}]")]
    return []


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# KubeRay's MaxRayServiceNameLength (RayCluster names are "<service>-<5 chars>", <= 53).
MAX_RAYSERVICE_NAME = 47


def validate_rayservice(obj: dict) -> None:
    """Validate a RayService like the API server and KubeRay's webhook checks would."""
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayService"
    errors = sorted(crd_validator("RayService").iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "RayService violates the KubeRay v1.7 CRD schema:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors
    )
    assert not _nulls(obj), f"null fields in the RayService: {_nulls(obj)}"
    # The RayCluster KubeRay creates from rayClusterConfig must be valid as well.
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": obj["metadata"]["name"] + "-abcde"},
        "spec": obj["spec"]["rayClusterConfig"],
    }
    errors = list(crd_validator("RayCluster").iter_errors(cluster))
    assert not errors, "rayClusterConfig violates the RayCluster CRD schema: " + "; ".join(
        e.message for e in errors
    )
    # KubeRay's ValidateRayServiceMetadata / ValidateRayClusterSpec, in Python.
    name = obj["metadata"]["name"]
    assert len(name) <= MAX_RAYSERVICE_NAME, f"RayService name {name!r} is over 47 characters"
    assert _DNS1035.match(name), f"RayService name {name!r} is not a DNS-1035 label"
    yaml.safe_load(obj["spec"]["serveConfigV2"])
    spec = obj["spec"]["rayClusterConfig"]
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    for group_name, group in pod_groups(obj).items():
        containers = group["template"]["spec"]["containers"]
        assert containers, f"{group_name}: no container"
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), params
        assert "labels" not in params, f"{group_name}: use the labels field, not --labels"
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            assert not group.get("resources"), f"{group_name}: resources set twice"
        for key, value in group.get("labels", {}).items():
            assert _QUALIFIED.match(key) and _LABEL_VALUE.match(value), (key, value)
        if group_name == "head":
            continue
        assert _DNS1035.match(group_name), f"group name {group_name!r}"
        if not autoscaling:
            assert "minReplicas" in group and "maxReplicas" in group, group_name
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def dashboard_json() -> dict:
    return json.loads(DASHBOARD.read_text())
