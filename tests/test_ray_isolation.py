"""The Ray tests leave a user's own Ray alone: each starts its Ray through
tests/ray_cluster.py (own temp dir, free ports, own token, stops only its own session),
and a cluster started outside the suite is still alive, untouched, after they all ran."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_cluster import REPO, RayHead, session_pids

TESTS = REPO / "tests"
HELPER = TESTS / "ray_cluster.py"
# What would start, join or stop a Ray outside the helper.
FORBIDDEN = (r"ray\.init\(", r"\bray\s+stop\b", r"[\"']stop[\"'],\s*[\"']--force", r"--num-cpus=4")


def suite_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if p not in (HELPER, Path(__file__).resolve()))


# Every Ray module starts Ray through the helper (the static test below checks it), so
# re-running one test per way the helper is used proves what re-running them all would,
# for a fraction of the minutes: `local_ray` with rank actors in a placement group,
# `tandem serve` starting and stopping a Ray of its own, and `ray serve deploy` on a
# RayHead (the README block's `ray start --head` is stopped by the same stop_session).
RERUN = ("cluster/test_ep_on_ray.py",
         "cluster/test_cli.py::test_tandem_serve_model_with_engine_flags_serves_with_those_settings",
         "cluster/test_ray_deploy.py::test_serve_deploy_in_mode_colocated_with_an_expert_parallel_pool")


def ray_test_modules() -> list[Path]:
    """The modules that start Ray: those that use the helper (a conftest's: its folder)."""
    users = [p for p in suite_files() if "tests.ray_cluster import" in p.read_text()]
    return sorted({p.parent if p.name == "conftest.py" else p for p in users})


def test_no_test_starts_or_stops_ray_but_through_the_helper():
    offenders = [f"{p.relative_to(REPO)}: {pattern}" for p in suite_files()
                 for pattern in FORBIDDEN if re.search(pattern, p.read_text())]
    assert not offenders, offenders
    assert {p.name for p in ray_test_modules()} >= {"test_ray_deploy.py", "test_pinning_on_ray.py",
                                                     "test_ep_on_ray.py", "test_cli.py"}


@pytest.mark.slow
def test_a_cluster_started_outside_the_suite_survives_the_ray_tests():
    """An outside head, with the variables a user of it would have exported (RAY_ADDRESS,
    its temp dir as the default one, its token), then a Ray test of each kind in a pytest
    of its own: the head and all its processes must still run, with no app on it."""
    with RayHead(num_cpus=1) as outside:
        before = set(session_pids(outside.process.pid))
        env = dict(outside.env, RAY_ADDRESS=outside.address, RAY_TMPDIR=str(outside.temp_dir),
                   RAY_DASHBOARD_ADDRESS=outside.dashboard)
        tests = [str(TESTS / m) for m in RERUN]
        assert {TESTS / m.split("::")[0] for m in RERUN} <= set(ray_test_modules())
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not gpu", "-p", "no:cacheprovider",
                              *tests], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert outside.alive(), outside.log()[-3000:]
        gone = before - set(session_pids(outside.process.pid))
        assert not gone, f"processes of the outside cluster ended: {sorted(gone)}"
        status = outside.ray("ray", "status", f"--address={outside.address}")
        assert len(re.findall(r"^\s*1 node_", status, re.M)) == 1, status
        apps = outside.ray("serve", "status", "-a", outside.dashboard, check=False)
        assert "tandem" not in apps, apps
