"""Every metric Tandem exports, named once (prefix `tandem_`, labels model_name and pool).

Standalone processes record into a prometheus-client registry served at /metrics.
Inside Ray, the same names are also recorded through Ray's metrics pipeline (what
KubeRay's PodMonitor scrapes; Ray adds a `ray_` prefix there). Histogram buckets put
the default SLO thresholds (TTFT 1 s, ITL 100 ms) on bucket edges, so the share of
requests under an SLO is exact in PromQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model_name", "pool")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class Spec:
    kind: str            # counter | gauge | histogram
    doc: str
    buckets: tuple[float, ...] = ()
    extra_labels: tuple[str, ...] = ()


METRICS: dict[str, Spec] = {
    "tandem_time_to_first_token_seconds": Spec("histogram", "Time to first token", TTFT_BUCKETS),
    "tandem_inter_token_latency_seconds": Spec("histogram", "Time between consecutive output tokens", ITL_BUCKETS),
    "tandem_time_per_output_token_seconds": Spec("histogram", "Mean inter-token time of a request", ITL_BUCKETS),
    "tandem_e2e_request_latency_seconds": Spec("histogram", "End-to-end request latency", E2E_BUCKETS),
    "tandem_num_requests_running": Spec("gauge", "Requests in the running batch"),
    "tandem_num_requests_waiting": Spec("gauge", "Requests waiting to be scheduled"),
    "tandem_kv_cache_usage_perc": Spec("gauge", "Fraction of KV-cache blocks in use (0-1)"),
    "tandem_prefix_cache_queries_total": Spec("counter", "Prompt tokens looked up in the prefix cache"),
    "tandem_prefix_cache_hits_total": Spec("counter", "Prompt tokens served from the prefix cache"),
    "tandem_prompt_tokens_total": Spec("counter", "Prompt tokens processed"),
    "tandem_generation_tokens_total": Spec("counter", "Tokens generated"),
    "tandem_request_success_total": Spec("counter", "Finished requests by finish reason", (), ("finished_reason",)),
    "tandem_requests_slo_met_total": Spec("counter", "Finished requests whose TTFT and mean ITL met the SLOs; "
                                                     "rate() of it is goodput"),
    "tandem_kv_transfer_bytes_total": Spec("counter", "KV bytes received from prefill engines"),
    "tandem_kv_transfer_seconds": Spec("histogram", "Duration of one request's KV transfer", ITL_BUCKETS),
    "tandem_kv_transfer_failures_total": Spec("counter", "Failed KV transfers by reason", (), ("reason",)),
    "tandem_kv_transfer_recomputed_total": Spec("counter", "Requests whose prefill was recomputed locally"),
    "tandem_requests_rejected_total": Spec("counter", "Requests refused at once (overload) by reason", (),
                                           ("reason",)),
    "tandem_requests_resumed_total": Spec("counter", "Streams resumed on another replica after theirs was lost"),
    "tandem_request_errors_total": Spec("counter", "Admitted requests that ended in an error, by kind", (),
                                        ("kind",)),
    "tandem_kv_transfer_recompute_failures_total": Spec("counter", "Local recomputes of a failed remote prefill "
                                                                   "that failed too"),
    "tandem_spec_decode_num_drafts_total": Spec("counter", "Speculative-decoding verification rounds (one per "
                                                           "request and step with drafts)"),
    "tandem_spec_decode_num_draft_tokens_total": Spec("counter", "Draft tokens verified"),
    "tandem_spec_decode_num_accepted_tokens_total": Spec("counter", "Draft tokens accepted"),
    "tandem_spec_decode_num_accepted_tokens_per_pos_total": Spec("counter", "Rounds that accepted the draft at "
                                                                            "each position (0: the first)", (),
                                                                 ("position",)),
    "tandem_eplb_balancedness": Spec("gauge", "Mean / max EP-rank expert load, worst layer of each group of "
                                              "consecutive MoE layers (layer=\"8-15\"; one layer each up to 8)", (),
                                     ("layer",)),
    "tandem_eplb_rebalances_total": Spec("counter", "EPLB rebalances finished"),
    "tandem_eplb_rebalance_seconds": Spec("histogram", "Duration of one EPLB rebalance", E2E_BUCKETS),
    "tandem_eplb_bytes_moved_total": Spec("counter", "Expert weight bytes moved by EPLB"),
    "tandem_eplb_step_hiccup_seconds": Spec("histogram", "Step time over the usual step while EPLB migrates "
                                                         "weights", ITL_BUCKETS),
    "tandem_eplb_rank_load": Spec("gauge", "Token-expert pairs each EP rank's slots served in the last load "
                                           "window, mean per MoE layer", (), ("rank",)),
    "tandem_eplb_rank_load_ratio": Spec("gauge", "EP rank load / mean rank load in the last load window "
                                                 "(1 = even)", (), ("rank",)),
    # Published by each autoscaled pool's policy (cluster/autoscaling.py) from Serve's controller.
    "tandem_autoscaling_current_replicas": Spec("gauge", "Running replicas of the pool"),
    "tandem_autoscaling_target_replicas": Spec("gauge", "Replicas Serve is moving the pool to"),
    "tandem_autoscaling_desired_replicas": Spec("gauge", "Replicas the SLO policy asks for, before Serve's "
                                                         "delays and bounds"),
    "tandem_autoscaling_prefill_backlog_tokens": Spec("gauge", "Prompt tokens waiting for their first token"),
    "tandem_autoscaling_prefill_tokens_per_second": Spec("gauge", "Measured prefill rate of one busy replica"),
    "tandem_autoscaling_ttft_estimate_seconds": Spec("gauge", "Time the prefill backlog takes to drain on the "
                                                              "current replicas"),
    "tandem_autoscaling_ttft_target_seconds": Spec("gauge", "Drain time the policy keeps the backlog under "
                                                            "(a share of the TTFT SLO)"),
    "tandem_autoscaling_itl_seconds": Spec("gauge", "Mean inter-token latency measured at the replicas"),
    "tandem_autoscaling_itl_target_seconds": Spec("gauge", "ITL the policy aims for (a share of the ITL SLO)"),
    "tandem_autoscaling_kv_cache_usage_perc": Spec("gauge", "Mean KV-cache usage over the pool's replicas (0-1)"),
}


class Metrics:
    """Records every metric into a prometheus-client registry and, when given, a Ray
    backend (`ray.util.metrics`) under the same names."""

    def __init__(self, model_name: str, pool: str, registry: CollectorRegistry | None = None,
                 ray_metrics=None) -> None:
        self.registry = registry or CollectorRegistry()
        self.base = {"model_name": model_name, "pool": pool}
        self._prom = {}
        self._ray = {}
        self._totals: dict[tuple[str, str | None], float] = {}   # engine counters' totals seen by record_stats
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        for name, spec in METRICS.items():
            labels = LABELS + spec.extra_labels
            kw = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
            prom_name = name.removesuffix("_total") if spec.kind == "counter" else name
            self._prom[name] = kinds[spec.kind](prom_name, spec.doc, labels, registry=self.registry, **kw)
            if ray_metrics is not None:
                rkinds = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge,
                          "histogram": ray_metrics.Histogram}
                rkw = {"boundaries": list(spec.buckets)} if spec.kind == "histogram" else {}
                self._ray[name] = rkinds[spec.kind](prom_name, description=spec.doc, tag_keys=labels, **rkw)

    def _labels(self, extra: dict | None) -> dict:
        return {**self.base, **(extra or {})}

    def inc(self, name: str, value: float = 1.0, **extra: str) -> None:
        if value <= 0:
            return
        labels = self._labels(extra)
        self._prom[name].labels(**labels).inc(value)
        if name in self._ray:
            self._ray[name].inc(value, tags=labels)

    def set(self, name: str, value: float, **extra: str) -> None:
        labels = self._labels(extra)
        self._prom[name].labels(**labels).set(value)
        if name in self._ray:
            self._ray[name].set(value, tags=labels)

    def record_stats(self, stats: dict[str, float | dict[str, float]]) -> None:
        """Bring the engine's series up to date from its `stats()` (keys are names without
        the prefix): gauges are set; counters, which the engine keeps as totals, grow by
        what was added since the last call. A dict value is a series per value of the
        metric's one extra label."""
        for key, value in stats.items():
            name = f"tandem_{key}"
            spec = METRICS[name]
            per_label = value.items() if isinstance(value, dict) else [(None, value)]
            for label, v in per_label:
                extra = {spec.extra_labels[0]: label} if label is not None else {}
                if spec.kind != "counter":
                    self.set(name, v, **extra)
                    continue
                last = self._totals.get((name, label), 0.0)
                # A total below the last (a restarted engine) starts over.
                self.inc(name, v - last if v >= last else v, **extra)
                self._totals[(name, label)] = v

    def observe(self, name: str, value: float, **extra: str) -> None:
        labels = self._labels(extra)
        self._prom[name].labels(**labels).observe(value)
        if name in self._ray:
            self._ray[name].observe(value, tags=labels)
