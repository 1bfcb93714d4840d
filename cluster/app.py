"""The Ray Serve application, built from one settings dict (`build_app(args)`).

Colocated mode: one Serve deployment whose replicas (Ray actors) each own an engine
and serve the OpenAI API built around it; Serve's proxy spreads requests over the
replicas by their ongoing-request counts. PD mode: a prefill pool and a decode pool
(cluster/pools.py).
"""

from __future__ import annotations

from ray import serve
from ray.util import metrics as ray_metrics

from cluster.metrics import Metrics
from cluster.openai_api import build_api
from cluster.pools import EngineReplica, build_pd_app
from cluster.settings import AppSettings, parse_settings
from engine.async_engine import AsyncEngine


@serve.ingress()
class EngineServer(EngineReplica):
    """One engine replica: an AsyncEngine and the FastAPI app in front of it."""

    def __init__(self, settings: AppSettings, pool: str) -> None:
        self.engine = AsyncEngine(settings.engine_config(), max_waiting=settings.max_waiting)
        self.metrics = Metrics(settings.model_name, pool, ray_metrics=ray_metrics)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        s = self.settings
        return build_api(self.engine, s.model_name, self.metrics, s.slo, s.api_key)


def build_app(args: dict | None = None):
    settings = parse_settings(args)
    if settings.mode == "pd":
        return build_pd_app(settings)
    pool = settings.pool("colocated")
    deployment = serve.deployment(
        EngineServer, name="Colocated", num_replicas=pool.replicas,
        ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
        max_ongoing_requests=settings.max_waiting + settings.engine_config().max_num_seqs,
        health_check_period_s=10)
    return deployment.bind(settings, "colocated")
