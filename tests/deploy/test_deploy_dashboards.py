"""The Grafana dashboard: every query is valid PromQL over real tandem metrics."""

from __future__ import annotations

import importlib.util
import re

import pytest

from deploy_support import DASHBOARD, REPO, dashboard_json

promql = pytest.importorskip("promql_parser", reason="promql-parser is not installed")

COUNTERS = {
    "tandem_requests_slo_met_total",
    "tandem_request_success_total",
    "tandem_prompt_tokens_total",
    "tandem_generation_tokens_total",
    "tandem_kv_transfer_bytes_total",
    "tandem_kv_transfer_failures_total",
    "tandem_kv_transfer_recomputed_total",
    "tandem_spec_decode_num_drafts_total",
    "tandem_spec_decode_num_accepted_tokens_total",
    "tandem_spec_decode_num_accepted_tokens_per_pos_total",
}
HISTOGRAMS = {
    "tandem_time_to_first_token_seconds",
    "tandem_inter_token_latency_seconds",
    "tandem_time_per_output_token_seconds",
    "tandem_kv_transfer_seconds",
}
GAUGES = {
    "tandem_num_requests_running",
    "tandem_num_requests_waiting",
    "tandem_kv_cache_usage_perc",
    "tandem_eplb_balancedness",
    "tandem_eplb_rank_load_ratio",
    "tandem_autoscaling_current_replicas",
    "tandem_autoscaling_target_replicas",
    "tandem_autoscaling_desired_replicas",
    "tandem_autoscaling_ttft_estimate_seconds",
    "tandem_autoscaling_ttft_target_seconds",
    "tandem_autoscaling_itl_seconds",
    "tandem_autoscaling_itl_target_seconds",
    "tandem_autoscaling_prefill_backlog_tokens",
    "tandem_autoscaling_prefill_tokens_per_second",
    "tandem_autoscaling_kv_cache_usage_perc",
}
METRICS = COUNTERS | HISTOGRAMS | GAUGES
PREFIXES = ("ray_", "")
# Values Grafana substitutes for its variables.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$model_name": ".*",
    "$pool": ".*",
}


def substitute(expr: str, prefix: str) -> str:
    expr = expr.replace("${prefix}", prefix).replace("$prefix", prefix)
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def selectors(node, functions=()):
    """(metric name, label matchers, enclosing function names) of every selector."""
    if isinstance(node, promql.VectorSelector):
        matchers = {m.name: (m.op, m.value) for m in node.matchers.matchers}
        yield node.name, matchers, functions
        return
    if isinstance(node, promql.Call):
        functions = (*functions, node.func.name)
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, float, str)):
            yield from selectors(child, functions)
    for arg in getattr(node, "args", None) or ():
        yield from selectors(arg, functions)


def panel_targets():
    for panel in dashboard_json()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def base_metric(name: str, prefix: str) -> str:
    assert name.startswith(prefix + "tandem_"), name
    return name[len(prefix) :]


def test_committed_json_is_what_the_builder_makes():
    path = REPO / "deploy" / "dashboards" / "build_dashboards.py"
    spec = importlib.util.spec_from_file_location("build_dashboards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUTPUT == DASHBOARD
    assert DASHBOARD.read_text() == module.render(), (
        "run python deploy/dashboards/build_dashboards.py"
    )


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_query_is_promql_over_real_tandem_metrics(prefix):
    used = set()
    count = 0
    for title, expr in panel_targets():
        tree = promql.parse(substitute(expr, prefix))
        found = list(selectors(tree))
        assert found, f"{title}: {expr} selects no series"
        for name, matchers, functions in found:
            count += 1
            metric = base_metric(name, prefix)
            # Every tandem series carries model_name and pool; every query filters both.
            assert matchers.get("model_name") == (promql.MatchOp.Re, ".*"), (title, expr)
            assert matchers.get("pool") == (promql.MatchOp.Re, ".*"), (title, expr)
            if metric.endswith("_bucket"):
                metric = metric.removesuffix("_bucket")
                assert metric in HISTOGRAMS, f"{title}: {name} is not a tandem histogram"
                assert functions[:1] == ("histogram_quantile",) and functions[-1] == "rate", (
                    title,
                    expr,
                )
            elif metric in COUNTERS:
                assert functions and functions[-1] in ("rate", "increase"), (title, expr)
            else:
                assert metric in GAUGES, f"{title}: {name} is not a tandem metric"
                assert not functions, f"{title}: gauge {name} inside {functions}"
            used.add(metric)
    assert count >= len(METRICS)
    assert used == METRICS, f"metrics without a panel: {sorted(METRICS - used)}"


def test_required_panels_exist():
    panels = {p["title"]: p for p in dashboard_json()["panels"] if p["type"] != "row"}

    def exprs(title):
        return " ".join(t["expr"] for t in panels[title]["targets"])

    goodput = exprs("Goodput vs request rate")
    assert "tandem_requests_slo_met_total" in goodput and "tandem_request_success_total" in goodput
    for title, histogram in [
        ("Time to first token (TTFT)", "tandem_time_to_first_token_seconds"),
        ("Inter-token latency (ITL)", "tandem_inter_token_latency_seconds"),
        ("Time per output token (TPOT)", "tandem_time_per_output_token_seconds"),
        ("KV-transfer latency", "tandem_kv_transfer_seconds"),
    ]:
        quantiles = re.findall(r"histogram_quantile\(([0-9.]+), sum by \(le, pool\)", exprs(title))
        assert quantiles == ["0.5", "0.9", "0.99"], title
        assert histogram in exprs(title)
        assert panels[title]["fieldConfig"]["defaults"]["unit"] == "s"
    assert "reason" in exprs("KV-transfer failures and recomputed prefills")
    assert "layer" in exprs("EPLB balancedness per layer")
    assert panels["KV-transfer bandwidth"]["fieldConfig"]["defaults"]["unit"] == "Bps"


def test_templating_variables():
    dashboard = dashboard_json()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "prefix", "model_name", "pool"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["prefix"]["query"] == "ray_"
    assert variables["prefix"]["current"]["value"] == "ray_"
    for name in ("model_name", "pool"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match and match.group(2) == name
        for prefix in PREFIXES:
            tree = promql.parse(substitute(match.group(1), prefix))
            assert {base_metric(n, prefix) for n, _, _ in selectors(tree)} <= GAUGES
    # Every panel and query reads from the chosen data source.
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_layout_has_unique_ids_and_no_overlap():
    panels = dashboard_json()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    dashboard = dashboard_json()
    assert dashboard["uid"] == "tandem-overview" and dashboard["title"]


def test_dashboard_metrics_match_the_servers_metric_table():
    """Names, kinds and labels agree with cluster/metrics.py, where every metric is named."""
    from cluster.metrics import LABELS, METRICS as SERVER_METRICS

    assert set(LABELS) == {"model_name", "pool"}
    kinds = {"counter": COUNTERS, "histogram": HISTOGRAMS, "gauge": GAUGES}
    for kind, names in kinds.items():
        for name in names:
            assert name in SERVER_METRICS, f"{name} is not exported by the server"
            assert SERVER_METRICS[name].kind == kind, name
    # Labels the dashboard groups by beyond model_name and pool.
    assert "reason" in SERVER_METRICS["tandem_kv_transfer_failures_total"].extra_labels
    assert "layer" in SERVER_METRICS["tandem_eplb_balancedness"].extra_labels
