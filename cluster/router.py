"""The router: the application's HTTP ingress, a Serve deployment of its own.

It holds no engine: it validates, tokenizes, sends each request to a replica of the
engine pool through a Serve handle (Serve picks the less loaded of two), turns tokens
into text and SSE chunks, and measures TTFT, ITL and goodput. Because no engine lives
here, an engine's death never takes HTTP handling with it: the stream goes on from
another replica (cluster/remote_engine.py). Its /metrics merges every replica's series.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics as ray_metrics

from cluster.elastic_ep_api import elastic_ep_router
from cluster.metrics import Metrics
from cluster.openai_api import build_api
from cluster.remote_engine import RemoteEngine
from cluster.replica_metrics import ClusterRegistry
from cluster.settings import AppSettings
from engine.engine_client import resolve_model_path
from engine.models.loader import load_config
from engine.request_limits import RequestLimits
from engine.tokenizer import load_tokenizer


@serve.ingress()
class Router:
    def __init__(self, settings: AppSettings, pool: DeploymentHandle) -> None:
        config = settings.engine_config()
        path = resolve_model_path(config.model)
        limits = RequestLimits.for_model(config, load_config(path))
        tokenizer = load_tokenizer(config.tokenizer or path)
        served_pool = "decode" if settings.mode == "pd" else "colocated"
        registry = ClusterRegistry(serve.get_replica_context().app_name)
        self.metrics = Metrics(settings.model_name, served_pool, registry=registry, ray_metrics=ray_metrics)
        self.engine = RemoteEngine(pool, tokenizer, limits, self.metrics, max_in_flight(settings))
        self.pool = pool
        self.settings = settings

    def __serve_build_asgi_app__(self):
        s = self.settings
        # Engine gauges arrive with the replicas' snapshots; nothing to refresh here.
        app = build_api(self.engine, s.model_name, self.metrics, s.slo, s.api_key,
                        refresh_gauges=lambda: None, max_body_bytes=s.max_body_bytes)
        app.include_router(elastic_ep_router(self.pool, s))     # /scale_elastic_ep, /rebalance_experts
        return app


def max_in_flight(settings: AppSettings) -> int:
    """This router's share of what the pool it feeds can hold: every replica full, and
    the handle's queue full."""
    pool = settings.pool("decode" if settings.mode == "pd" else "colocated")
    per_replica = settings.max_waiting + settings.engine_config().max_num_seqs
    queued = pool.max_queued_requests if pool.max_queued_requests is not None else per_replica
    return max(1, (pool.max_num_replicas * per_replica + queued) // settings.pool("router").replicas)


def router_deployment(settings: AppSettings):
    """Sized so that health and metrics never queue behind generation: the router's
    own limit is well above what the pools can hold; the pools refuse overload."""
    p = settings.pool("router")
    return serve.deployment(
        Router, name="Router", num_replicas=p.replicas, max_ongoing_requests=settings.router_max_ongoing_requests,
        # Serve's own refusal (plain text) only past the router's limit: below it, the
        # router answers every refusal itself, in OpenAI's shape.
        max_queued_requests=p.max_queued_requests if p.max_queued_requests is not None
        else settings.router_max_ongoing_requests,
        ray_actor_options={**p.actor_options(), "num_gpus": 0})
