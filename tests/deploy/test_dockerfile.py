"""The Dockerfile builds the image the chart runs: checks that need no Docker daemon
(the image itself is built outside CI), reading the Dockerfile against the chart and
pyproject.toml, and the build context against .dockerignore."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import pytest
import yaml

from live_support import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
CHART = REPO / "deploy" / "helm" / "tandem"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)


def test_image_matches_the_charts_expectations():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert instructions()[0] == ("FROM", "python:3.11-slim")
    # The chart's default image is tandem:<appVersion>: the package version it installs.
    assert values["image"]["repository"] == "tandem" and values["image"]["tag"] == ""
    assert chart["appVersion"] == project["version"]
    # Ray inside the image is the version KubeRay is told (rayVersion).
    assert args()["RAY_VERSION"] == values["rayVersion"]
    run = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert '"ray[serve]==${RAY_VERSION}"' in run and '".[${EXTRAS}]"' in run
    assert args()["EXTRAS"] == "serve" and "serve" in project["optional-dependencies"]
    assert "import ray, cluster.app" in run       # the import KubeRay's Serve will do
    # Ports the chart's containers name are exposed.
    exposed = {int(p) for word, rest in instructions() if word == "EXPOSE" for p in rest.split()}
    assert {values["metricsPort"], values["dashboardAgentPort"],
            values["serveConfig"]["http_options"]["port"], 6379, 8265, 10001} <= exposed
    # The default command is the project's own entry point.
    cmd = next(rest for word, rest in instructions() if word == "CMD")
    assert cmd.startswith('["tandem", "serve"') and "tandem" in project["scripts"]


def context_files() -> list[str]:
    """Files `docker build .` would send: the tracked and untracked, non-ignored files
    that .dockerignore lets in (its rules are the simple ones used here)."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout: cannot tell source files from build outputs")
    files = listing.stdout.split()
    rules = [r for r in (REPO / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]

    def matches(pattern: str, parts: list[str]) -> bool:
        if pattern.startswith("**/"):                  # any component, at any depth
            return any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        # A pattern naming a directory covers everything under it.
        return any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))

    def included(path: str) -> bool:
        keep = True
        for rule in rules:                             # the last matching rule wins
            if matches(rule.removeprefix("!").removesuffix("/"), path.split("/")):
                keep = rule.startswith("!")
        return keep

    return [f for f in files if (REPO / f).is_file() and included(f)]


def test_build_context_holds_the_package_and_nothing_else():
    files = context_files()
    tops = {f.split("/")[0] for f in files}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.removesuffix("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    existing = {p for p in packages if (REPO / p).is_dir()}
    assert existing <= tops, f"packages missing from the build context: {existing - tops}"
    assert {"engine", "cluster"} <= existing
    assert {"pyproject.toml", "README.md", "config.yaml"} <= tops     # README: the package's readme
    assert tops <= existing | {"pyproject.toml", "README.md", "config.yaml"}, tops
    assert "cluster/dashboard.html" in files                        # package data of /dashboard
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
