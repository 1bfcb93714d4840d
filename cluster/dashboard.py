"""The built-in dashboard (/dashboard) for users without Grafana.

It plots the headline panels of the Grafana dashboard (deploy/dashboards), with the same
titles, from the server's own metrics: a MetricsHistory samples the registry every
second, /dashboard/data derives the series (rates, quantiles) as JSON, and
dashboard.html (self-contained: inline JS drawing SVG, nothing fetched from elsewhere)
polls it. Panels whose metrics do not exist yet (KV transfer, EPLB) say "no data".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from cluster import metrics_history as mh
from cluster.metrics import Metrics

PAGE = Path(__file__).with_name("dashboard.html")
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Line:
    """One line (per group) of a panel: how to derive it and how to name it."""
    kind: str                      # rate | gauge | quantile | ratio
    metric: str
    legend: str                    # "{pool}" and other group labels are filled in
    by: tuple[str, ...] = ("pool",)
    q: float = 0.0                 # quantile
    agg: str = "sum"               # gauge aggregation over series: sum | max | mean | min
    dashed: bool = False           # drawn dashed (a reference line another may cover)
    over: str = ""                 # ratio: offset + rate(metric) / rate(over)
    offset: float = 0.0


@dataclass(frozen=True)
class Panel:
    id: str
    title: str                     # the Grafana panel's title
    unit: str                      # reqps | s | tokps | short | ratio | Bps
    lines: tuple[Line, ...]


def _quantiles(histogram: str) -> tuple[Line, ...]:
    return tuple(Line("quantile", histogram, f"p{round(q * 100)} {{pool}}", q=q) for q in QUANTILES)


PANELS: tuple[Panel, ...] = (
    Panel("goodput", "Goodput vs request rate", "reqps", (
        Line("rate", "tandem_requests_slo_met_total", "goodput {pool}"),
        Line("rate", "tandem_request_success_total", "requests {pool}", dashed=True))),
    Panel("ttft", "Time to first token (TTFT)", "s", _quantiles("tandem_time_to_first_token_seconds")),
    Panel("itl", "Inter-token latency (ITL)", "s", _quantiles("tandem_inter_token_latency_seconds")),
    Panel("tokens", "Tokens per second", "tokps", (
        Line("rate", "tandem_prompt_tokens_total", "prompt {pool}"),
        Line("rate", "tandem_generation_tokens_total", "generation {pool}"))),
    Panel("requests", "Requests running / waiting", "short", (
        Line("gauge", "tandem_num_requests_running", "running {pool}"),
        Line("gauge", "tandem_num_requests_waiting", "waiting {pool}"))),
    Panel("kv_cache", "KV-cache usage", "ratio", (
        Line("gauge", "tandem_kv_cache_usage_perc", "max {pool}", agg="max"),
        Line("gauge", "tandem_kv_cache_usage_perc", "mean {pool}", agg="mean"))),
    Panel("kv_bandwidth", "KV-transfer bandwidth", "Bps", (
        Line("rate", "tandem_kv_transfer_bytes_total", "{pool}"),)),
    Panel("kv_failures", "KV-transfer failures and recomputed prefills", "reqps", (
        Line("rate", "tandem_kv_transfer_failures_total", "failed {pool} {reason}", by=("pool", "reason")),
        Line("rate", "tandem_kv_transfer_recomputed_total", "recomputed {pool}"))),
    Panel("spec_decode", "Speculative decoding: mean acceptance length", "short", (
        Line("ratio", "tandem_spec_decode_num_accepted_tokens_total", "{pool}",
             over="tandem_spec_decode_num_drafts_total", offset=1.0),)),
    Panel("autoscaling", "Autoscaling: replicas per pool", "short", (
        Line("gauge", "tandem_autoscaling_current_replicas", "current {pool}", agg="max"),
        Line("gauge", "tandem_autoscaling_target_replicas", "target {pool}", agg="max", dashed=True),
        Line("gauge", "tandem_autoscaling_desired_replicas", "desired {pool}", agg="max", dashed=True))),
    Panel("autoscaling_slo", "Autoscaling: TTFT and ITL against the SLO", "s", (
        Line("gauge", "tandem_autoscaling_ttft_estimate_seconds", "backlog drain {pool}", agg="max"),
        Line("gauge", "tandem_autoscaling_ttft_target_seconds", "TTFT target {pool}", agg="max", dashed=True),
        Line("gauge", "tandem_autoscaling_itl_seconds", "ITL {pool}", agg="max"),
        Line("gauge", "tandem_autoscaling_itl_target_seconds", "ITL target {pool}", agg="max", dashed=True))),
    Panel("autoscaling_backlog", "Autoscaling: prefill backlog", "short", (
        Line("gauge", "tandem_autoscaling_prefill_backlog_tokens", "tokens waiting {pool}", agg="max"),
        Line("gauge", "tandem_autoscaling_prefill_tokens_per_second", "tokens/s per replica {pool}", agg="max",
             dashed=True),
        Line("gauge", "tandem_autoscaling_kv_cache_usage_perc", "KV usage {pool}", agg="max"))),
    Panel("eplb", "EPLB balancedness per layer", "ratio", (
        Line("gauge", "tandem_eplb_balancedness", "worst layer {pool}", agg="min"),
        Line("gauge", "tandem_eplb_balancedness", "mean {pool}", agg="mean"))),
    Panel("eplb_ranks", "EPLB load per rank", "short", (
        Line("gauge", "tandem_eplb_rank_load_ratio", "rank {rank} {pool}", by=("pool", "rank"), agg="max"),)),
)

_AGG = {"sum": sum, "max": max, "min": min, "mean": statistics.fmean}


def _series(samples: list[mh.Sample], line: Line, window: int) -> dict[tuple[str, ...], mh.Series]:
    if line.kind == "rate":
        # Counter samples carry the _total suffix, as the metric table names them.
        return mh.counter_rate(samples, line.metric, window, line.by)
    if line.kind == "quantile":
        return mh.histogram_quantile(samples, line.metric, line.q, window, line.by)
    if line.kind == "ratio":
        num = mh.counter_rate(samples, line.metric, window, line.by)
        den = mh.counter_rate(samples, line.over, window, line.by)
        return {key: [line.offset + n / d if n is not None and d else None
                      for n, d in zip(values, den.get(key, [None] * len(values)))] for key, values in num.items()}
    return mh.gauge(samples, line.metric, line.by, _AGG[line.agg])


def _round(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.6g}")


def panel_data(samples: list[mh.Sample], window: int, first: int = 0) -> list[dict]:
    """Every panel's lines from sample `first` on (earlier samples only feed the first
    points' windows), as JSON-ready dicts."""
    out = []
    for panel in PANELS:
        series = []
        for line in panel.lines:
            for key, values in _series(samples, line, window).items():
                series.append({"name": line.legend.format(**dict(zip(line.by, key))), "dashed": line.dashed,
                               "values": [_round(v) for v in values[first:]]})
        points = sum(v is not None for s in series for v in s["values"])
        out.append({"id": panel.id, "title": panel.title, "unit": panel.unit,
                    "series": series, "points": points})
    return out


def slo_attainment(samples: list[mh.Sample]) -> float | None:
    """Share of requests finished in the samples' time span that met every SLO."""
    if len(samples) < 2:
        return None

    def total(s: mh.Sample, name: str) -> float:
        return sum(s.values.get(name, {}).values())

    first, last = samples[0], samples[-1]
    done = total(last, "tandem_request_success_total") - total(first, "tandem_request_success_total")
    met = total(last, "tandem_requests_slo_met_total") - total(first, "tandem_requests_slo_met_total")
    return met / done if done > 0 else None


def dashboard_router(refresh_gauges: Callable[[], None], metrics: Metrics, interval: float = 1.0,
                     capacity: int = 900) -> APIRouter:
    """/dashboard (the page) and /dashboard/data (its JSON), sampling `metrics` while the
    app runs (`refresh_gauges` first brings the engine gauges up to date)."""
    history = mh.MetricsHistory(metrics.registry, interval, capacity, before_sample=refresh_gauges)

    @asynccontextmanager
    async def lifespan(_app):
        history.start()
        try:
            yield
        finally:
            history.stop()

    router = APIRouter(lifespan=lifespan)
    page = PAGE.read_text(encoding="utf-8")

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        history.start()   # in case the ASGI server runs no lifespan
        return HTMLResponse(page)

    @router.get("/dashboard/data")
    async def dashboard_data(
        window: int = Query(10, ge=1, le=300, description="rate/quantile window, in samples"),
        seconds: float = Query(300, ge=5, le=86400, description="history to return, in seconds"),
    ):
        history.start()
        samples = history.samples(seconds + window * interval)
        start = samples[-1].time - seconds if samples else 0.0
        first = next((i for i, s in enumerate(samples) if s.time >= start), 0)
        return {
            "model_name": metrics.base["model_name"],
            "interval_s": interval,
            "window_s": window * interval,
            "times": [round(s.time, 3) for s in samples[first:]],
            "slo_attainment": _round(slo_attainment(samples[first:])),
            "panels": panel_data(samples, window, first),
        }

    return router
