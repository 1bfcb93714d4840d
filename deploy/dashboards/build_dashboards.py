"""Build Tandem's Grafana dashboard JSON from the panel definitions below.

The JSON is written into the Helm chart (deploy/helm/tandem/dashboards/), which ships
it as a ConfigMap labelled grafana_dashboard: "1"; deploy/k8s is rendered from the
chart, so it carries the same JSON. Edit this file, then run

    python deploy/dashboards/build_dashboards.py

tests/deploy fails when the committed JSON differs from what this file builds.

Every tandem series has the labels `model_name` and `pool`. Under Ray's metrics
pipeline the names get a `ray_` prefix (ray_tandem_...); a standalone server exports
plain tandem_...: the dashboard's `prefix` variable (default `ray_`) covers both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT = (
    Path(__file__).resolve().parents[1] / "helm" / "tandem" / "dashboards" / "tandem-overview.json"
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Label filter every query carries.
SEL = 'model_name=~"$model_name", pool=~"$pool"'
RATE = "[$__rate_interval]"
QUANTILES = (0.5, 0.9, 0.99)


def metric(name: str) -> str:
    """A tandem series name with the dashboard's prefix variable in front."""
    return "${prefix}" + name


def rate(name: str, by: str = "pool") -> str:
    """Per-second rate of a counter, summed by `by`."""
    return f"sum by ({by}) (rate({metric(name)}{{{SEL}}}{RATE}))"


def quantile(q: float, histogram: str) -> str:
    """A quantile of a histogram's distribution over the rate interval, per pool."""
    return (
        f"histogram_quantile({q}, sum by (le, pool) "
        f"(rate({metric(histogram)}_bucket{{{SEL}}}{RATE})))"
    )


def quantile_targets(histogram: str) -> list[tuple[str, str]]:
    return [(quantile(q, histogram), f"p{round(q * 100)} {{{{pool}}}}") for q in QUANTILES]


class Layout:
    """Places panels left to right in rows of 24 grid units, numbering them."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def add(self, panel: dict, width: int, height: int = 8) -> None:
        if self.x + width > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": height, "w": width, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)


def targets(queries: list[tuple[str, str]]) -> list[dict]:
    return [
        {
            "datasource": DATASOURCE,
            "expr": expr,
            "legendFormat": legend,
            "range": True,
            "refId": chr(ord("A") + i),
        }
        for i, (expr, legend) in enumerate(queries)
    ]


def timeseries(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    unit: str,
    *,
    minimum: float | None = 0,
    maximum: float | None = None,
) -> dict:
    defaults: dict = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"},
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["mean", "max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(queries),
    }


def stat(
    title: str, description: str, queries: list[tuple[str, str]], unit: str, thresholds: list
) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "max": 1,
                "thresholds": {"mode": "absolute", "steps": thresholds},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "value_and_name",
        },
        "targets": targets(queries),
    }


RED_YELLOW_GREEN = [
    {"color": "red", "value": None},
    {"color": "yellow", "value": 0.9},
    {"color": "green", "value": 0.99},
]


def panels() -> list[dict]:
    layout = Layout()

    layout.row("Goodput and traffic")
    layout.add(
        timeseries(
            "Goodput vs request rate",
            "Goodput: finished requests per second that met every SLO (TTFT and ITL "
            "thresholds of the app's `slo` settings), from tandem_requests_slo_met_total. "
            "Request rate: finished requests per second, from tandem_request_success_total.",
            [
                (rate("tandem_requests_slo_met_total"), "goodput {{pool}}"),
                (rate("tandem_request_success_total"), "requests {{pool}}"),
            ],
            "reqps",
        ),
        16,
    )
    layout.add(
        stat(
            "SLO attainment",
            "Share of finished requests that met every SLO over the dashboard's time range.",
            [
                (
                    f"sum by (pool) (increase({metric('tandem_requests_slo_met_total')}"
                    f"{{{SEL}}}[$__range])) / sum by (pool) (increase("
                    f"{metric('tandem_request_success_total')}{{{SEL}}}[$__range]))",
                    "{{pool}}",
                )
            ],
            "percentunit",
            RED_YELLOW_GREEN,
        ),
        8,
    )

    layout.row("Latency")
    layout.add(
        timeseries(
            "Time to first token (TTFT)",
            "p50/p90/p99 of the time from arrival to the first output token, per pool.",
            quantile_targets("tandem_time_to_first_token_seconds"),
            "s",
        ),
        8,
    )
    layout.add(
        timeseries(
            "Inter-token latency (ITL)",
            "p50/p90/p99 of the time between consecutive output tokens, per pool.",
            quantile_targets("tandem_inter_token_latency_seconds"),
            "s",
        ),
        8,
    )
    layout.add(
        timeseries(
            "Time per output token (TPOT)",
            "p50/p90/p99 of each request's (end-to-end - TTFT) / (output tokens - 1).",
            quantile_targets("tandem_time_per_output_token_seconds"),
            "s",
        ),
        8,
    )

    layout.row("Throughput and load")
    layout.add(
        timeseries(
            "Tokens per second",
            "Prompt tokens processed and output tokens generated per second, per pool.",
            [
                (rate("tandem_prompt_tokens_total"), "prompt {{pool}}"),
                (rate("tandem_generation_tokens_total"), "generation {{pool}}"),
            ],
            "short",
        ),
        8,
    )
    layout.add(
        timeseries(
            "Requests running / waiting",
            "Requests the engines are running and requests queued, summed per pool.",
            [
                (
                    f"sum by (pool) ({metric('tandem_num_requests_running')}{{{SEL}}})",
                    "running {{pool}}",
                ),
                (
                    f"sum by (pool) ({metric('tandem_num_requests_waiting')}{{{SEL}}})",
                    "waiting {{pool}}",
                ),
            ],
            "short",
        ),
        8,
    )
    layout.add(
        timeseries(
            "KV-cache usage",
            "Fraction of KV-cache blocks in use (0-1): the fullest engine and the mean, per pool.",
            [
                (
                    f"max by (pool) ({metric('tandem_kv_cache_usage_perc')}{{{SEL}}})",
                    "max {{pool}}",
                ),
                (
                    f"avg by (pool) ({metric('tandem_kv_cache_usage_perc')}{{{SEL}}})",
                    "mean {{pool}}",
                ),
            ],
            "percentunit",
            maximum=1,
        ),
        8,
    )

    layout.row("KV transfer (mode pd)")
    layout.add(
        timeseries(
            "KV-transfer bandwidth",
            "Bytes of KV blocks moved from prefill to decode engines per second (NIXL).",
            [(rate("tandem_kv_transfer_bytes_total"), "{{pool}}")],
            "Bps",
        ),
        8,
    )
    layout.add(
        timeseries(
            "KV-transfer latency",
            "p50/p90/p99 of one request's KV-block transfer time.",
            quantile_targets("tandem_kv_transfer_seconds"),
            "s",
        ),
        8,
    )
    layout.add(
        timeseries(
            "KV-transfer failures and recomputed prefills",
            "Failed transfers per second by reason, and requests whose prefill the decode "
            "engine recomputed after a failed or timed-out transfer (same answer, more work).",
            [
                (
                    rate("tandem_kv_transfer_failures_total", "pool, reason"),
                    "failed {{pool}} {{reason}}",
                ),
                (rate("tandem_kv_transfer_recomputed_total"), "recomputed {{pool}}"),
            ],
            "reqps",
        ),
        8,
    )

    layout.row("Autoscaling (pools with `autoscaling`)")

    def gauge(name: str, legend: str) -> tuple[str, str]:
        return f"max by (pool) ({metric(name)}{{{SEL}}})", legend

    layout.add(
        timeseries(
            "Autoscaling: replicas per pool",
            "Running replicas of each autoscaled pool, the target Serve is moving it to, and "
            "what the SLO policy asks for before Serve's delays and bounds.",
            [
                gauge("tandem_autoscaling_current_replicas", "current {{pool}}"),
                gauge("tandem_autoscaling_target_replicas", "target {{pool}}"),
                gauge("tandem_autoscaling_desired_replicas", "desired {{pool}}"),
            ],
            "short",
        ),
        8,
    )
    layout.add(
        timeseries(
            "Autoscaling: TTFT and ITL against the SLO",
            "The policy's inputs: time the prefill backlog takes to drain on the current "
            "replicas against its share of the TTFT SLO, and the replicas' mean ITL against "
            "its share of the ITL SLO.",
            [
                gauge("tandem_autoscaling_ttft_estimate_seconds", "backlog drain {{pool}}"),
                gauge("tandem_autoscaling_ttft_target_seconds", "TTFT target {{pool}}"),
                gauge("tandem_autoscaling_itl_seconds", "ITL {{pool}}"),
                gauge("tandem_autoscaling_itl_target_seconds", "ITL target {{pool}}"),
            ],
            "s",
        ),
        8,
    )
    layout.add(
        timeseries(
            "Autoscaling: prefill backlog",
            "Prompt tokens waiting for their first token, the measured prefill rate of one "
            "busy replica (tokens/s), and the pool's mean KV-cache usage (0-1).",
            [
                gauge("tandem_autoscaling_prefill_backlog_tokens", "tokens waiting {{pool}}"),
                gauge("tandem_autoscaling_prefill_tokens_per_second", "tokens/s per replica {{pool}}"),
                gauge("tandem_autoscaling_kv_cache_usage_perc", "KV usage {{pool}}"),
            ],
            "short",
        ),
        8,
    )

    layout.row("Expert load balance (EPLB)")
    layout.add(
        timeseries(
            "EPLB balancedness per layer",
            "Mean expert load / max expert load in each MoE layer (1 = perfectly even).",
            [
                (
                    f"avg by (pool, layer) ({metric('tandem_eplb_balancedness')}{{{SEL}}})",
                    "{{pool}} layer {{layer}}",
                )
            ],
            "percentunit",
            maximum=1,
        ),
        16,
    )
    layout.add(
        stat(
            "Worst layer balancedness",
            "The least balanced MoE layer, per pool.",
            [
                (
                    f"min by (pool) ({metric('tandem_eplb_balancedness')}{{{SEL}}})",
                    "{{pool}}",
                )
            ],
            "percentunit",
            [
                {"color": "red", "value": None},
                {"color": "yellow", "value": 0.6},
                {"color": "green", "value": 0.8},
            ],
        ),
        8,
    )
    layout.add(
        timeseries(
            "EPLB load per rank",
            "Token-expert pairs each EP rank's expert slots served in the last load window, "
            "over the mean rank's (1 = even; the highest rank sets every step's pace).",
            [
                (
                    f"max by (pool, rank) ({metric('tandem_eplb_rank_load_ratio')}{{{SEL}}})",
                    "{{pool}} rank {{rank}}",
                )
            ],
            "short",
        ),
        24,
    )
    layout.row("Speculative decoding (P-EAGLE)")
    accepted, drafts = (f"sum by (pool) (rate({metric(n)}{{{SEL}}}{RATE}))" for n in (
        "tandem_spec_decode_num_accepted_tokens_total", "tandem_spec_decode_num_drafts_total"))
    layout.add(
        timeseries(
            "Speculative decoding: mean acceptance length",
            "Tokens per verification round: 1 + accepted drafts / rounds (the bonus token counts).",
            [(f"1 + {accepted} / {drafts}", "{{pool}}")],
            "short",
        ),
        12,
    )
    layout.add(
        timeseries(
            "Speculative decoding: acceptance by draft position",
            "Share of verification rounds that accepted the draft at each position (0: the first).",
            [
                (
                    f"sum by (pool, position) (rate({metric('tandem_spec_decode_num_accepted_tokens_per_pos_total')}"
                    f"{{{SEL}}}{RATE})) / ignoring(position) group_left {drafts}",
                    "{{pool}} position {{position}}",
                )
            ],
            "percentunit",
            maximum=1,
        ),
        12,
    )
    return layout.panels


def query_variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
    }


def templating() -> dict:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
            },
            {
                "name": "prefix",
                "label": "Metric prefix",
                "description": "ray_ when metrics go through Ray's metrics pipeline (KubeRay, "
                "ray serve deploy); empty for a standalone tandem server.",
                "type": "textbox",
                "query": "ray_",
                "current": {"text": "ray_", "value": "ray_"},
                "hide": 0,
            },
            query_variable(
                "model_name",
                "Model",
                "label_values(${prefix}tandem_num_requests_running, model_name)",
            ),
            query_variable(
                "pool",
                "Pool",
                "label_values(${prefix}tandem_num_requests_running"
                '{model_name=~"$model_name"}, pool)',
            ),
        ]
    }


def dashboard() -> dict:
    return {
        "uid": "tandem-overview",
        "title": "Tandem / Serving overview",
        "description": "Goodput, latency, throughput, KV cache, KV transfer and EPLB of a "
        "Tandem deployment, per model and pool.",
        "tags": ["tandem", "llm", "ray"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON is out of date"
    )
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).as_posix()}")
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
