"""The engine pools: Serve deployments whose replicas (Ray actors) each own one engine.

A replica serves no HTTP: the router (cluster/router.py) sends it requests through a
Serve handle and it streams token deltas back (`generate`). Colocated replicas run
prefill and decode; in the disaggregated ("pd") topology a decode replica asks a
prefill replica (through the prefill deployment's handle) to compute the prompt and
keep its KV, pulls the KV through the configured KV connector (NIXL) and decodes. Each replica's `check_health` is its
engine loop's liveness, so Serve replaces a dead or stuck engine; each publishes its
metrics for the router's /metrics. A pool with `parallel.enable_expert_parallel` has
expert-parallel replicas: each is one Serve replica whose ranks are Ray actors in the
replica's own placement group (cluster/ep_replica.py, cluster/ep_ranks.py). Engine-level
logic lives in `engine/`, `disagg/` and `eplb/`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address
from ray.util import metrics as ray_metrics

from cluster.autoscaling import replica_env, serve_autoscaling_config
from cluster.ep_replica import ElasticEP, forward_eplb_metrics, replica_parallel
from cluster.kv_transfer_metrics import KVTransferMetrics
from cluster.metrics import Metrics
from cluster.pool_load import PoolLoad
from cluster.remote_engine import error_item, token_delta
from cluster.replica_metrics import MetricsPublisher
from cluster.settings import AppSettings
from disagg.prefill_decode import PrefillDecodeEngine, prefill_request
from engine.async_engine import AsyncEngine
from engine.sampling_params import SamplingParams


class EngineReplica(ElasticEP):
    """A Serve replica (Ray actor) that owns one engine and stops it with the actor."""
    engine: AsyncEngine | PrefillDecodeEngine

    def _start(self, settings: AppSettings, pool: str, engine_factory) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.model_name, pool, ray_metrics=ray_metrics)
        self.load = PoolLoad()
        self.engine = engine_factory(settings, self.metrics)
        forward_eplb_metrics(self.engine, self.metrics)
        ctx = serve.get_replica_context()
        self.publisher = MetricsPublisher(ctx.app_name, ctx.replica_id.unique_id, self.metrics.registry,
                                          before=lambda: self.metrics.record_stats(self.engine.stats()))

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream one request's token deltas (see cluster/remote_engine.py); an engine
        error is the stream's last item."""
        rid = request["request_id"]
        self.load.admit(rid, len(request["prompt_token_ids"]) + len(request.get("output_token_ids") or ()))
        try:
            params = SamplingParams(**request["sampling"])
            async for delta in self.engine.generate(request["prompt_token_ids"], params, rid,
                                                    output_prefix=request.get("output_token_ids")):
                self.load.tokens(rid, len(delta.new_token_ids))
                yield token_delta(delta)
        except Exception as e:
            item = error_item(e)
            if item is None:
                raise
            yield item
        finally:
            self.load.finish(rid)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler calls this; the pool's policy reads the series (cluster/autoscaling.py)."""
        stats = self.engine.stats()
        return self.load.stats(stats["kv_cache_usage_perc"], int(stats["num_requests_running"]))

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica for replacement."""
        self.engine.check_health()

    def __del__(self) -> None:
        publisher, engine = getattr(self, "publisher", None), getattr(self, "engine", None)
        if publisher is not None:
            publisher.stop()
        if engine is not None:
            self._drain_held_kv()
            engine.shutdown()

    def _drain_held_kv(self) -> None:
        """A prefill replica being removed (scale-down) has finished its requests but may
        still hold their KV for decode replicas to read: it waits for the reads, at most
        the lease, so no hand-off in flight falls back to a recompute."""
        core = getattr(self.engine, "core", None)
        deadline = time.monotonic() + self.settings.kv_transfer.get("lease_s", 30.0)
        while getattr(core, "has_held_blocks", False) and time.monotonic() < deadline:
            time.sleep(0.05)


def local_engine(settings: AppSettings, metrics: Metrics, pool: str = "colocated") -> AsyncEngine:
    """The pool's engine: one process, or an EP engine whose ranks are Ray actors."""
    return AsyncEngine(settings.engine_config(), max_waiting=settings.max_waiting,
                       parallel=replica_parallel(settings, pool))


def handoff_engine(settings: AppSettings, metrics: Metrics, pool: str) -> AsyncEngine:
    """The pool's engine (one process, or an EP engine whose ranks each run a connector)
    with the configured KV connector (kv_transfer.kv_connector), for either side of a KV
    hand-off; its transfers (all its ranks') count in this replica's metrics."""
    config = settings.engine_config()
    observer = KVTransferMetrics(metrics, config.kv_load_failure_policy)
    # The side channel's address must be routable from other nodes, unlike localhost
    # (an EP rank binds its own node's address: engine/distributed/rank_kv_transfer.py).
    spec = settings.kv_connector_spec(host=get_node_ip_address())
    return AsyncEngine(config, max_waiting=settings.max_waiting, kv_transfer=spec, kv_observer=observer,
                       parallel=replica_parallel(settings, pool))


class ColocatedServer(EngineReplica):
    """One engine that prefills and decodes."""

    def __init__(self, settings: AppSettings) -> None:
        self._start(settings, "colocated", local_engine)


class PrefillServer(EngineReplica):
    """A prefill replica: computes prompts and keeps their KV for a decode replica."""

    def __init__(self, settings: AppSettings) -> None:
        self._start(settings, "prefill", lambda s, m: handoff_engine(s, m, "prefill"))

    async def prefill(self, request: dict) -> dict:
        rid = request["request_id"]
        self.load.admit(rid, len(request["prompt_token_ids"]))
        try:
            out = await prefill_request(self.engine, request)
            self.load.tokens(rid, len(out["token_ids"]))
            return out
        finally:
            self.load.finish(rid)


class DecodeServer(EngineReplica):
    """A decode replica: remote prefill (local when the prefill pool fails), local decode."""

    def __init__(self, settings: AppSettings, prefill: DeploymentHandle) -> None:
        self.prefill_pool = prefill

        def pd_engine(settings: AppSettings, metrics: Metrics) -> PrefillDecodeEngine:
            decode = handoff_engine(settings, metrics, "decode")
            return PrefillDecodeEngine(decode, self._prefill, decode.kv_observer,
                                       prefill_timeout_s=settings.prefill_timeout_s)
        self._start(settings, "decode", pd_engine)

    async def _prefill(self, request: dict) -> dict:
        return await self.prefill_pool.prefill.remote(request)


def engine_deployment(cls, name: str, settings: AppSettings, pool: str):
    """A pool's Serve deployment: replicas take `max_num_seqs + max_waiting` requests
    each (what the engine admits); beyond that a caller queues at most
    `max_queued_requests` more and the rest are refused at once (503). With
    `autoscaling`, the SLO policy sizes the pool (cluster/autoscaling.py)."""
    p = settings.pool(pool)
    capacity = settings.max_waiting + settings.engine_config().max_num_seqs
    # An EP replica and its ranks share one placement group (bundle 0: the replica).
    placement = {} if not p.parallel.enable_expert_parallel else {
        "placement_group_bundles": p.placement_group_bundles(),
        "placement_group_strategy": p.parallel.placement_strategy}
    options = p.actor_options()
    scaling = {"num_replicas": p.replicas}
    if p.autoscaling is not None:
        a = p.autoscaling
        scaling = {"autoscaling_config": serve_autoscaling_config(pool, a, settings.slo.ttft_ms, settings.slo.itl_ms,
                                                                  settings.model_name),
                   "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s}
        env = options.setdefault("runtime_env", {})
        options["runtime_env"] = {**env, "env_vars": {**replica_env(a), **env.get("env_vars", {})}}
    return serve.deployment(
        cls, name=name, max_ongoing_requests=capacity,
        max_queued_requests=p.max_queued_requests if p.max_queued_requests is not None else capacity,
        ray_actor_options=options, **placement, **scaling,
        health_check_period_s=settings.health_check_period_s, health_check_timeout_s=30)


def build_pools(settings: AppSettings):
    """The bound deployment the router sends requests to, for the settings' mode."""
    if settings.mode == "pd":
        prefill = engine_deployment(PrefillServer, "Prefill", settings, "prefill").bind(settings)
        return engine_deployment(DecodeServer, "Decode", settings, "decode").bind(settings, prefill)
    return engine_deployment(ColocatedServer, "Colocated", settings, "colocated").bind(settings)
