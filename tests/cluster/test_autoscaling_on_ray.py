"""A prefill pool that sizes itself on a local Ray cluster (CPU, the embedded model):
`tandem bench serve` ramps the request rate up, the SLO policy adds prefill replicas
through Serve's autoscaler, and once the load stops it removes them again (Serve drains
each: no new requests, it finishes what it holds), within the bounds. Every admitted
request completes, and the replica counts show in Serve's status and on /metrics.
Delays and windows are seconds here (minutes in production)."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import bench_serve
from tests.ray_cluster import local_serve_app

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 3,
               "look_back_period_s": 4, "metrics_interval_s": 0.5, "graceful_shutdown_timeout_s": 20}
APP_ARGS = {
    "mode": "pd",
    "engine": {"max_model_len": 512, "max_num_seqs": 4, "kv_cache_memory_gb": 0.05},
    "max_waiting": 64,
    "prefill_timeout_s": 30.0,
    "pools": {"router": {"replicas": 1, "num_cpus": 0.1},
              "prefill": {"num_cpus": 0.1, "autoscaling": AUTOSCALING},
              "decode": {"replicas": 1, "num_cpus": 0.1}},
    # A TTFT SLO a CPU prefill of a few 300-token prompts already threatens.
    "slo": {"ttft_ms": 50, "itl_ms": 60000},
}


def prefill_replicas() -> int:
    from ray import serve
    status = serve.status().applications["tandem"].deployments["Prefill"]
    return status.replica_states.get("RUNNING", 0)


def series(url: str, name: str):
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def gauges(url: str, name: str) -> dict[str, float]:
    """By pool (one series per pool: the autoscaler's)."""
    return {s.labels["pool"]: s.value for s in series(url, name)}


def samples(url: str, name: str) -> list[float]:
    return [s.value for s in series(url, name)]


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def app():
    with local_serve_app(json.loads(json.dumps(APP_ARGS)), num_cpus=2) as url:
        wait_for(lambda: healthy(url), "the application to come up", 180)
        yield url


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:       # not listening yet
        return False


def test_a_ramp_scales_the_prefill_pool_up_and_idle_scales_it_down(app):
    url = app
    assert prefill_replicas() == 1
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    ns = parser.parse_args(["--base-url", url, "--disable-tqdm", "--num-prompts", "120", "--random-input-len", "300",
                            "--random-output-len", "4", "--ramp-up-strategy", "linear", "--ramp-up-start-rps", "2",
                            "--ramp-up-end-rps", "30", "--seed", "3"])
    seen = {"max": 1, "metric_max": 0.0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            n, g = prefill_replicas(), gauges(url, "tandem_autoscaling_current_replicas").get("prefill", 0.0)
            seen["max"], seen["metric_max"] = max(seen["max"], n), max(seen["metric_max"], g)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results, _, _ = asyncio.run(bench_serve.drive(ns))
        # Held at the top until Serve has started the second replica, then the load stops.
        wait_for(lambda: seen["max"] == 2, "the prefill pool to scale up", 60)
        wait_for(lambda: seen["metric_max"] == 2, "/metrics to show both prefill replicas", 30)
    finally:
        stop.set()
        watcher.join()
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed                                   # every admitted request completed
    assert all(r.output_len == 4 for r in results)
    target = gauges(url, "tandem_autoscaling_target_replicas")
    assert set(target) == {"prefill"} and 1 <= target["prefill"] <= 2   # only the autoscaled pool
    # Idle: back to min_replicas, never below.
    wait_for(lambda: prefill_replicas() == 1 and gauges(url, "tandem_autoscaling_current_replicas")["prefill"] == 1,
             "the prefill pool to scale back down", 60)
    backlog = gauges(url, "tandem_autoscaling_prefill_backlog_tokens")
    assert backlog["prefill"] == 0
    # The removed replica held its KV until the decode side read it: no hand-off fell back.
    assert sum(samples(url, "tandem_kv_transfer_bytes_total")) > 0
    assert sum(samples(url, "tandem_kv_transfer_failures_total") + samples(url, "tandem_kv_transfer_recomputed_total")) == 0
    # The router's dashboard (sampled every second) plots the pool's replicas over the ramp.
    def plotted_down() -> list[float] | None:
        panels = httpx.get(f"{url}/dashboard/data", params={"seconds": 300}, timeout=30).json()["panels"]
        series = next(p for p in panels if p["id"] == "autoscaling")["series"]
        values = [v for v in next(s["values"] for s in series if s["name"] == "current prefill") if v is not None]
        return values if values and values[-1] == 1 else None
    assert max(wait_for(plotted_down, "the dashboard to plot the scale-down", 30)) == 2
    r = httpx.post(f"{url}/v1/completions", json={"model": "tandem-default", "prompt": [1, 2, 3], "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
