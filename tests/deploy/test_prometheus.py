"""A real Prometheus (Debian's `prometheus`) scrapes a running tandem server; the Grafana
dashboard's own PromQL for goodput and TTFT p99 returns numbers after a short load."""

from __future__ import annotations

import math
import subprocess
import time

import httpx
import pytest
import yaml

from live_support import (
    free_port,
    grafana_builder,
    grafana_query,
    send_load,
    substitute,
    system_tool,
    tandem_server,
)

REQUESTS = 12
SCRAPE_S = 1


@pytest.fixture(scope="module")
def binary():
    return system_tool("prometheus", "prometheus")


@pytest.fixture(scope="module")
def server(binary):   # no model load when the test is going to skip
    with tandem_server() as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(binary, server, tmp_path_factory):
    """`prometheus` scraping the server's /metrics every second; yields its API URL."""
    root = tmp_path_factory.mktemp("prometheus")
    target = server.removeprefix("http://")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [{"job_name": "tandem", "metrics_path": "/metrics",
                            "scrape_timeout": f"{SCRAPE_S}s",
                            "static_configs": [{"targets": [target]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(root / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited: {(root / 'prometheus.log').read_text()}"
            assert time.monotonic() < deadline, "prometheus did not become ready in 60 s"
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    assert body["data"]["resultType"] == "vector"
    return body["data"]["result"]


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def loaded(server, prometheus):
    """Prometheus has scraped the server healthily, then the whole of a short load."""
    def target_up():
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return targets and all(t["health"] == "up" for t in targets)

    wait_for(target_up, "the tandem target to be scraped")
    send_load(server, REQUESTS)

    def all_requests_scraped():
        result = query(prometheus, "sum(tandem_request_success_total)")
        return result and float(result[0]["value"][1]) == REQUESTS

    wait_for(all_requests_scraped, f"Prometheus to see {REQUESTS} finished requests")
    return prometheus


def one_number(result: list[dict]) -> float:
    assert len(result) == 1, result
    assert result[0]["metric"] == {"pool": "colocated"}, "the dashboard's queries group by pool"
    value = float(result[0]["value"][1])
    assert math.isfinite(value), result
    return value


def test_goodput_from_the_dashboard_query(loaded):
    goodput_expr = grafana_query("Goodput vs request rate", "goodput", __rate_interval="1m")
    requests_expr = grafana_query("Goodput vs request rate", "requests", __rate_interval="1m")
    assert goodput_expr.startswith("sum by (pool) (rate(tandem_requests_slo_met_total{")
    goodput = one_number(query(loaded, goodput_expr))
    request_rate = one_number(query(loaded, requests_expr))
    assert 0 < goodput and 0 < request_rate
    # Every request met the loose SLOs. The two rates extrapolate from their series' own
    # first scrapes, so they agree closely rather than exactly; the totals agree exactly.
    assert goodput == pytest.approx(request_rate, rel=0.1)
    met = query(loaded, "sum(tandem_requests_slo_met_total)")
    assert float(met[0]["value"][1]) == REQUESTS


def test_ttft_p99_from_the_dashboard_query(loaded):
    p99_expr = grafana_query("Time to first token (TTFT)", "p99", __rate_interval="1m")
    p50_expr = grafana_query("Time to first token (TTFT)", "p50", __rate_interval="1m")
    assert p99_expr.startswith("histogram_quantile(0.99, sum by (le, pool) (rate(")
    assert "tandem_time_to_first_token_seconds_bucket{" in p99_expr
    p99 = one_number(query(loaded, p99_expr))
    p50 = one_number(query(loaded, p50_expr))
    from cluster.metrics import TTFT_BUCKETS
    assert 0 < p50 <= p99 <= TTFT_BUCKETS[-1]


def test_every_dashboard_query_is_accepted_by_prometheus(loaded):
    """Prometheus itself parses and evaluates every query of the Grafana dashboard."""
    count = 0
    for panel in grafana_builder().panels():
        for target in panel.get("targets", []):
            query(loaded, substitute(target["expr"], __rate_interval="1m", __range="1h"))
            count += 1
    assert count >= 20
