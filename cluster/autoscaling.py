"""Pools that size themselves from the SLOs: a Ray Serve autoscaling policy per pool.

Serve's controller runs `SLOPolicy` (the deployment's `autoscaling_config.policy`) every
control-loop tick with the series each replica records (cluster/pool_load.py). The
policy turns them into the replicas the pool needs; Serve then applies the delays
(`upscale_delay_s`, `downscale_delay_s`) and the bounds, starts replicas, and stops
surplus ones gracefully: a stopping replica takes no new request and finishes what it
holds (up to `graceful_shutdown_timeout_s`; a stream cut later resumes on another
replica, cluster/remote_engine.py). Nothing of our own schedules replicas.

What each pool needs:
- prefill: enough replicas that the prompt tokens waiting drain within a share of the
  TTFT SLO at the measured prefill rate per replica (backlog / (rate * target)), and no
  fewer than keep each replica busy at most `target_prefill_utilization` of the time.
- decode: the inter-token latency against a share of the ITL SLO (where replicas batch
  requests) and the KV usage against a target, each scaling the current count (ITL and
  KV use fall as a pool's requests spread over more replicas).
- colocated: the larger of both.
The result moves at most `max_upscale_step` replicas up or `max_downscale_step` down per
decision. The policy's inputs and decisions are published for /metrics.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, fields

from cluster import pool_load as pl

KINDS = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class AutoscalingSettings:
    """A pool's `autoscaling:` block. Serve's own names for what Serve does (bounds,
    delays, look-back), ours for what the SLO policy adds."""
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0     # window of the replicas' series the policy reads
    metrics_interval_s: float = 10.0     # how often replicas send their series to Serve
    max_upscale_step: int = 2            # replicas added per decision at most
    max_downscale_step: int = 1          # replicas removed per decision at most
    ttft_slo_fraction: float = 0.5       # share of the TTFT SLO the prefill backlog may take
    target_prefill_utilization: float = 0.8    # busy share of time a prefill replica runs at
    itl_slo_fraction: float = 0.8        # ITL the decode pool aims for, as a share of the SLO
    target_kv_cache_usage: float = 0.8   # KV usage the decode pool aims for
    graceful_shutdown_timeout_s: float = 60.0   # a replica being removed finishes its requests

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError(f"autoscaling.min_replicas must be >= 1 (a pool of 0 has no engine to take the "
                             f"first request), got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) must be >= min_replicas "
                             f"({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling.initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                             f"and max_replicas ({self.min_replicas}..{self.max_replicas})")
        if self.max_upscale_step < 1 or self.max_downscale_step < 1:
            raise ValueError("autoscaling.max_upscale_step and max_downscale_step must be >= 1")
        for name in ("ttft_slo_fraction", "target_prefill_utilization", "itl_slo_fraction",
                     "target_kv_cache_usage"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"autoscaling.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("upscale_delay_s", "downscale_delay_s", "graceful_shutdown_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"autoscaling.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("look_back_period_s", "metrics_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"autoscaling.{name} must be > 0, got {getattr(self, name)}")
        if self.look_back_period_s <= self.metrics_interval_s:
            # Serve warns now and will refuse later: the window must hold more than one report.
            raise ValueError(f"autoscaling.look_back_period_s ({self.look_back_period_s}) must be greater than "
                             f"metrics_interval_s ({self.metrics_interval_s})")


def parse_autoscaling(block: dict | None) -> AutoscalingSettings | None:
    if block is None:
        return None
    if not isinstance(block, dict):
        raise TypeError(f"autoscaling must be a mapping of {', '.join(f.name for f in fields(AutoscalingSettings))}")
    unknown = set(block) - {f.name for f in fields(AutoscalingSettings)}
    if unknown:
        raise ValueError(f"unknown autoscaling settings: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(f.name for f in fields(AutoscalingSettings))})")
    return AutoscalingSettings(**block)


def serve_autoscaling_config(kind: str, a: AutoscalingSettings, ttft_ms: float, itl_ms: float,
                             model_name: str) -> dict:
    """Serve's `autoscaling_config` for a pool of `kind`, with the SLO policy."""
    return {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": a.initial_replicas,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s, "metrics_interval_s": a.metrics_interval_s,
            "policy": {"policy_function": SLOPolicy,
                       "policy_kwargs": {"kind": kind, "ttft_ms": ttft_ms, "itl_ms": itl_ms,
                                         "model_name": model_name, "settings": asdict(a)}}}


def replica_env(a: AutoscalingSettings) -> dict[str, str]:
    """Environment of an autoscaled pool's replicas: how often they send Serve their series."""
    return {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": str(a.metrics_interval_s)}


# -- the decision, as pure functions over the replicas' series --------------------------

@dataclass(frozen=True)
class PoolSignals:
    """A pool's load over the policy's window, summed or averaged over its replicas."""
    replicas: int
    prompt_tokens_waiting: float = 0.0   # latest, summed
    busy_replicas: float | None = 0.0    # replicas' worth of busy time; None: not known yet
    prefill_tokens_per_s: float = 0.0    # per busy replica; 0: nothing prefilled in the window
    itl_s: float = 0.0                   # mean gap between tokens; 0: no tokens in the window
    kv_cache_usage: float = 0.0          # latest, mean over replicas
    running: float = 0.0                 # latest requests running per replica, mean


@dataclass(frozen=True)
class Decision:
    need: float                          # replicas the signals ask for
    desired: int                         # after the step caps
    ttft_estimate_s: float = 0.0         # the backlog's drain time with the current replicas


def prefill_need(s: PoolSignals, ttft_target_s: float, utilization: float) -> tuple[float, float]:
    """(replicas, backlog drain time in s) for the prefill side."""
    # Not known yet (a window too short to say): hold.
    busy = s.replicas if s.busy_replicas is None else s.busy_replicas / utilization
    if s.prefill_tokens_per_s <= 0:
        # Nothing prefilled in the window yet: no rate to judge a backlog by, so hold.
        return (float(s.replicas) if s.prompt_tokens_waiting > 0 else busy), 0.0
    drain_s = s.prompt_tokens_waiting / (s.prefill_tokens_per_s * max(s.replicas, 1))
    backlog = s.prompt_tokens_waiting / (s.prefill_tokens_per_s * ttft_target_s)
    return max(busy, backlog), drain_s


def decode_need(s: PoolSignals, itl_target_s: float, target_kv: float) -> float:
    # ITL falls with more replicas only where requests share steps: a replica running one
    # request at a time is at the engine's floor, which more replicas cannot lower.
    itl = s.itl_s / itl_target_s if s.running > 1 else 0.0
    return s.replicas * max(itl, s.kv_cache_usage / target_kv)


def decide(kind: str, s: PoolSignals, target: int, ttft_ms: float, itl_ms: float,
           t: AutoscalingSettings) -> Decision:
    """The replicas a pool of `kind` wants, moved from Serve's current `target` by at most
    the step caps and kept within the bounds (Serve then applies the delays)."""
    p_need, drain_s, d_need = 0.0, 0.0, 0.0
    if kind in ("prefill", "colocated"):
        p_need, drain_s = prefill_need(s, ttft_ms / 1000 * t.ttft_slo_fraction, t.target_prefill_utilization)
    if kind in ("decode", "colocated"):
        d_need = decode_need(s, itl_ms / 1000 * t.itl_slo_fraction, t.target_kv_cache_usage)
    need = max(p_need, d_need)
    desired = min(max(math.ceil(need - 1e-9), target - t.max_downscale_step), target + t.max_upscale_step)
    desired = min(max(desired, t.min_replicas), t.max_replicas)
    return Decision(need, desired, drain_s)


def _delta(series) -> tuple[float, float]:
    """(value change, seconds) over a replica's series of a cumulative counter."""
    if not series or len(series) < 2:
        return 0.0, 0.0
    return series[-1].value - series[0].value, series[-1].timestamp - series[0].timestamp


def signals_from(raw: dict, replicas: int, min_span_s: float = 0.0) -> PoolSignals:
    """PoolSignals from Serve's raw series ({name: {replica: [(timestamp, value)...]}}).
    A replica's busy share counts once its series spans `min_span_s` (a new replica's
    first seconds say little about how busy it stays); the pool's is their mean."""
    def per_replica(name):
        return (raw or {}).get(name, {})

    def latest(name):
        return [ts[-1].value for ts in per_replica(name).values() if ts]

    shares, prefilled, busy_s, itl_sum, itl_n = [], 0.0, 0.0, 0.0, 0.0
    for replica, series in per_replica(pl.PREFILL_BUSY_S).items():
        d_busy, span = _delta(series)
        if span > 0:
            if span >= min_span_s:
                shares.append(min(1.0, d_busy / span))
            busy_s += d_busy
            prefilled += _delta(per_replica(pl.PROMPT_TOKENS_PREFILLED).get(replica))[0]
    for replica, series in per_replica(pl.ITL_SUM_S).items():
        itl_sum += _delta(series)[0]
        itl_n += _delta(per_replica(pl.ITL_COUNT).get(replica))[0]
    kv, running = latest(pl.KV_CACHE_USAGE), latest(pl.REQUESTS_RUNNING)
    return PoolSignals(replicas=replicas, prompt_tokens_waiting=sum(latest(pl.PROMPT_TOKENS_WAITING)),
                       busy_replicas=sum(shares) / len(shares) * replicas if shares else None, prefill_tokens_per_s=prefilled / busy_s if busy_s > 0 else 0.0,
                       itl_s=itl_sum / itl_n if itl_n > 0 else 0.0, kv_cache_usage=sum(kv) / len(kv) if kv else 0.0,
                       running=sum(running) / len(running) if running else 0.0)


# -- the policy Serve's controller runs ---------------------------------------------------

class SLOPolicy:
    """Serve's custom autoscaling policy for one pool (built once per deployment config,
    with `policy_kwargs`), called with an AutoscalingContext every control-loop tick."""

    def __init__(self, kind: str, ttft_ms: float, itl_ms: float, model_name: str = "",
                 settings: dict | None = None, publish: bool = True) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.ttft_ms, self.itl_ms, self.model_name = kind, ttft_ms, itl_ms, model_name
        self.settings = AutoscalingSettings(**(settings or {}))
        self.metrics = None
        self.publish = publish

    def __call__(self, ctx) -> tuple[int, dict]:
        signals = signals_from(ctx.raw_metrics, ctx.current_num_replicas, ctx.config.look_back_period_s / 2)
        d = decide(self.kind, signals, ctx.target_num_replicas, self.ttft_ms, self.itl_ms, self.settings)
        if self.publish:
            self._publish(ctx, signals, d)
        return d.desired, {}

    def _publish(self, ctx, s: PoolSignals, d: Decision) -> None:
        """The inputs and decision as gauges, for the router's /metrics and Ray's pipeline.
        Metrics must never stop the autoscaler."""
        try:
            if self.metrics is None:
                self.metrics = PolicyMetrics(ctx.app_name, self.kind, self.model_name)
                weakref.finalize(self, self.metrics.stop)
            t = self.settings
            self.metrics.record(current=ctx.current_num_replicas, target=ctx.target_num_replicas, desired=d.desired,
                                backlog=s.prompt_tokens_waiting, rate=s.prefill_tokens_per_s,
                                ttft=d.ttft_estimate_s, ttft_target=self.ttft_ms / 1000 * t.ttft_slo_fraction,
                                itl=s.itl_s, itl_target=self.itl_ms / 1000 * t.itl_slo_fraction,
                                kv=s.kv_cache_usage)
        except Exception:
            import logging
            logging.getLogger(__name__).exception("publishing autoscaling metrics failed")


# The policy's gauges by what they show (names in cluster/metrics.py).
GAUGES = {"current": "tandem_autoscaling_current_replicas", "target": "tandem_autoscaling_target_replicas",
          "desired": "tandem_autoscaling_desired_replicas",
          "backlog": "tandem_autoscaling_prefill_backlog_tokens",
          "rate": "tandem_autoscaling_prefill_tokens_per_second",
          "ttft": "tandem_autoscaling_ttft_estimate_seconds", "ttft_target": "tandem_autoscaling_ttft_target_seconds",
          "itl": "tandem_autoscaling_itl_seconds", "itl_target": "tandem_autoscaling_itl_target_seconds",
          "kv": "tandem_autoscaling_kv_cache_usage_perc"}


class PolicyMetrics:
    """The policy's gauges, published under the app's metrics like a replica's."""

    def __init__(self, app: str, pool: str, model_name: str) -> None:
        from ray.util import metrics as ray_metrics

        from cluster.metrics import Metrics
        from cluster.replica_metrics import MetricsPublisher
        self.metrics = Metrics(model_name, pool, ray_metrics=ray_metrics)
        self.publisher = MetricsPublisher(app, f"autoscaler-{pool}", self.metrics.registry)

    def record(self, **values: float) -> None:
        for key, value in values.items():
            self.metrics.set(GAUGES[key], value)

    def stop(self) -> None:
        self.publisher.stop()
