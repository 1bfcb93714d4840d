"""The built-in dashboard: its metric history and PromQL-like maths on a real
prometheus-client registry, and /dashboard + /dashboard/data on a running server."""

from __future__ import annotations

import importlib.util
import math
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from cluster import metrics_history as mh
from cluster.dashboard import PANELS
from cluster.metrics import TTFT_BUCKETS, Metrics

REPO = Path(__file__).resolve().parents[2]
INF = math.inf


# ---------------------------------------------------------------------------------
# histogram_quantile and rate, as Prometheus computes them


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, [(0.1, 0), (0.5, 10), (1.0, 10), (INF, 10)], 0.3),    # interpolated inside (0.1, 0.5]
    (0.5, [(1.0, 4), (INF, 4)], 0.5),                          # lowest bucket starts at 0
    (0.99, [(1.0, 1), (2.0, 1), (INF, 10)], 2.0),              # +Inf bucket: highest finite bound
    (0.9, [(0.1, 5), (0.2, 10), (INF, 10)], 0.18),
    (0.5, [(0.1, 0), (INF, 0)], None),                         # no observation
    (0.5, [(0.1, 3), (0.2, 3)], None),                         # no +Inf bucket
])
def test_bucket_quantile_follows_prometheus(q, buckets, expected):
    got = mh.bucket_quantile(q, buckets)
    assert got == (None if expected is None else pytest.approx(expected))


def test_history_rates_and_quantiles_from_a_real_registry():
    registry = CollectorRegistry()
    metrics = Metrics("m", "colocated", registry=registry)
    history = mh.MetricsHistory(registry, interval=1.0, capacity=10)
    history.sample_now()
    metrics.inc("tandem_request_success_total", 6, finished_reason="length")
    metrics.inc("tandem_request_success_total", 4, finished_reason="stop")
    for v in [0.02] * 90 + [0.3] * 10:      # p50 in (0.01, 0.025], p99 in (0.25, 0.5]
        metrics.observe("tandem_time_to_first_token_seconds", v)
    time.sleep(0.05)
    history.sample_now()
    s0, s1 = history.samples()
    rate = mh.counter_rate([s0, s1], "tandem_request_success_total", window=1)
    # Summed over finished_reason by pool; the labelled series did not exist at s0 (counts from 0).
    assert list(rate) == [("colocated",)]
    assert rate[("colocated",)][0] is None            # no earlier sample for the first point
    assert rate[("colocated",)][1] == pytest.approx(10 / (s1.time - s0.time))
    p50 = mh.histogram_quantile([s0, s1], "tandem_time_to_first_token_seconds", 0.5, window=1)
    p99 = mh.histogram_quantile([s0, s1], "tandem_time_to_first_token_seconds", 0.99, window=1)
    assert 0.01 < p50[("colocated",)][1] <= 0.025
    assert 0.25 < p99[("colocated",)][1] <= 0.5
    # A window with no new observation has no quantile (a gap, not a stale value).
    history.sample_now()
    p99 = mh.histogram_quantile(history.samples(), "tandem_time_to_first_token_seconds", 0.99, window=1)
    assert p99[("colocated",)][2] is None
    metrics.set("tandem_eplb_balancedness", 0.5, layer="0")
    metrics.set("tandem_eplb_balancedness", 0.9, layer="1")
    history.sample_now()
    worst = mh.gauge(history.samples(), "tandem_eplb_balancedness", agg=min)
    assert worst[("colocated",)][-1] == 0.5 and worst[("colocated",)][0] is None


def test_sampler_thread_samples_and_survives_errors():
    registry = CollectorRegistry()
    Metrics("m", "colocated", registry=registry)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first refresh fails")

    history = mh.MetricsHistory(registry, interval=0.05, capacity=5, before_sample=flaky)
    history.start()
    history.start()   # idempotent
    try:
        deadline = time.monotonic() + 10
        while len(history.samples()) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        history.stop()
    assert len(calls) >= 6 and len(history.samples()) == 5   # ring buffer keeps the newest
    times = [s.time for s in history.samples()]
    assert times == sorted(times)
    with pytest.raises(ValueError):
        mh.MetricsHistory(registry, interval=0)


def test_panels_are_the_grafana_dashboards_panels():
    """Same titles as the Grafana dashboard, over metrics the server exports."""
    from cluster.metrics import METRICS

    path = REPO / "deploy" / "dashboards" / "build_dashboards.py"
    spec = importlib.util.spec_from_file_location("build_dashboards", path)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    grafana = {p["title"]: p for p in builder.panels() if p["type"] != "row"}
    for panel in PANELS:
        assert panel.title in grafana, panel.title
        exprs = " ".join(t["expr"] for t in grafana[panel.title]["targets"])
        for line in panel.lines:
            assert line.metric in METRICS
            assert line.metric in exprs, (panel.title, line.metric)
    headline = {"Goodput vs request rate", "Time to first token (TTFT)", "Inter-token latency (ITL)",
                "Tokens per second", "Requests running / waiting", "KV-cache usage",
                "KV-transfer bandwidth", "EPLB balancedness per layer"}
    assert headline <= {p.title for p in PANELS}


# ---------------------------------------------------------------------------------
# On a running server


def data(url: str, **params) -> dict:
    r = httpx.get(f"{url}/dashboard/data", params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def values(body: dict, panel_id: str, line: str) -> list[float]:
    panel = next(p for p in body["panels"] if p["id"] == panel_id)
    series = next((s for s in panel["series"] if s["name"] == line), None)
    if series is None:
        return []
    assert len(series["values"]) == len(body["times"])
    return [v for v in series["values"] if v is not None]


def test_dashboard_data_after_requests(api_server):
    url, _ = api_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
    for i in range(4):
        client.completions.create(model="tandem-default", prompt="dash " * (i + 1), max_tokens=8,
                                  extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 20
    while not values(body := data(url), "goodput", "goodput colocated"):
        assert time.monotonic() < deadline, "no goodput point appeared"
        time.sleep(0.3)
    assert body["model_name"] == "tandem-default" and body["interval_s"] == 1.0
    assert body["times"] == sorted(body["times"])
    assert max(values(body, "goodput", "goodput colocated")) > 0
    assert max(values(body, "goodput", "requests colocated")) > 0
    assert body["slo_attainment"] == 1.0                  # the fixture's SLOs are 60 s
    p99 = values(body, "ttft", "p99 colocated")
    assert p99 and all(0 < v <= TTFT_BUCKETS[-1] for v in p99)
    assert max(values(body, "tokens", "generation colocated")) > 0
    assert values(body, "requests", "running colocated")    # gauges are sampled too
    assert all(0 <= v <= 1 for v in values(body, "kv_cache", "max colocated"))
    for nothing_yet in ("kv_bandwidth", "kv_failures", "eplb"):
        panel = next(p for p in body["panels"] if p["id"] == nothing_yet)
        assert panel["series"] == [] and panel["points"] == 0
    # A shorter range returns fewer points; a wider window smooths over more samples.
    assert len(data(url, seconds=5)["times"]) <= 7
    assert data(url, window=30)["window_s"] == 30.0


def test_dashboard_page_is_self_contained(api_server):
    url, _ = api_server
    r = httpx.get(f"{url}/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    # The drawing code is inline and reads this server's /dashboard/data.
    assert "<script>" in page and '+ "/data"' in page and "createElementNS" in page
    # Nothing is loaded from elsewhere: no external scripts, styles, fonts or images.
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert "@import" not in page and "url(" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls    # the SVG namespace name, not a fetch


@pytest.mark.parametrize("params", [{"window": 0}, {"window": "x"}, {"seconds": -1}])
def test_bad_dashboard_parameters_get_a_clear_400(api_server, params):
    url, _ = api_server
    r = httpx.get(f"{url}/dashboard/data", params=params)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health").status_code == 200
