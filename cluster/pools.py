"""The prefill and decode pools of the disaggregated ("pd") application.

Each replica of either pool is a Ray actor owning one engine with a NIXL connector. The
decode pool is the ingress: a decode replica takes the HTTP request, asks a prefill
replica (Serve's router picks the less loaded of two by queue length) to prefill it and
keep the KV, pulls the KV over NIXL and decodes. Engine-level logic lives in `disagg/`;
this module only places it on Ray.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address
from ray.util import metrics as ray_metrics

from cluster.kv_transfer_metrics import KVTransferMetrics
from cluster.metrics import Metrics
from cluster.openai_api import build_api
from cluster.settings import AppSettings
from disagg.nixl_connector import NixlConnector
from disagg.prefill_decode import PrefillDecodeEngine, prefill_request
from engine.async_engine import AsyncEngine


def _engine(settings: AppSettings, metrics: Metrics) -> AsyncEngine:
    config = settings.engine_config()
    observer = KVTransferMetrics(metrics, config.kv_load_failure_policy)
    host = get_node_ip_address()    # routable from other nodes, unlike localhost

    def connector(core):
        return NixlConnector.for_engine(core, host=host, observer=observer, **settings.kv_transfer)
    return AsyncEngine(config, max_waiting=settings.max_waiting, kv_transfer=connector)


class EngineReplica:
    """A Serve replica (Ray actor) that owns one engine and stops it with the actor."""
    engine: AsyncEngine

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class PrefillServer(EngineReplica):
    """A prefill replica: computes prompts and keeps their KV for a decode replica."""

    def __init__(self, settings: AppSettings) -> None:
        self.metrics = Metrics(settings.model_name, "prefill", ray_metrics=ray_metrics)
        self.engine = _engine(settings, self.metrics)

    async def prefill(self, request: dict) -> dict:
        return await prefill_request(self.engine, request)


@serve.ingress()
class DecodeServer(EngineReplica):
    """A decode replica: the OpenAI API, remote prefill, local decode."""

    def __init__(self, settings: AppSettings, prefill: DeploymentHandle) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.model_name, "decode", ray_metrics=ray_metrics)
        self.engine = _engine(settings, self.metrics)
        self.prefill_pool = prefill
        self.pd = PrefillDecodeEngine(self.engine, self._prefill, self.engine.kv_transfer.observer)

    async def _prefill(self, request: dict) -> dict:
        return await self.prefill_pool.prefill.remote(request)

    def __serve_build_asgi_app__(self):
        s = self.settings
        return build_api(self.pd, s.model_name, self.metrics, s.slo, s.api_key)


def build_pd_app(settings: AppSettings):
    max_ongoing = settings.max_waiting + settings.engine_config().max_num_seqs
    prefill, decode = settings.pool("prefill"), settings.pool("decode")
    prefill_dep = serve.deployment(
        PrefillServer, name="Prefill", num_replicas=prefill.replicas, max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": prefill.num_cpus, "num_gpus": prefill.num_gpus}, health_check_period_s=10)
    decode_dep = serve.deployment(
        DecodeServer, name="Decode", num_replicas=decode.replicas, max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": decode.num_cpus, "num_gpus": decode.num_gpus}, health_check_period_s=10)
    return decode_dep.bind(settings, prefill_dep.bind(settings))
