"""The application's settings: one plain dict (the `args` of config.yaml's application,
or the chart's values), validated into dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cluster.autoscaling import AutoscalingSettings, parse_autoscaling
from cluster.parallel_settings import COORDINATOR_CPUS, PoolParallel, check_model_fits
from cluster.request_metrics import SLO
from disagg.connector import DEFAULT_CONNECTOR, connector_spec
from engine.config import EngineConfig
from engine.engine_client import ParallelConfig
from engine.kv_transfer import KVConnectorSpec

MODES = ("colocated", "pd")
# Connector settings an app may set (`kv_transfer:`), with their defaults in disagg:
# kv_connector names the backend (disagg/connector.py's registry), the rest its settings.
KV_TRANSFER_KEYS = ("kv_connector", "lease_s", "handshake_timeout_s", "transfer_timeout_s")


@dataclass
class PoolSettings:
    replicas: int = 1
    num_cpus: float = 1
    num_gpus: float = 0
    # Requests a caller (the router) may hold for this pool while it picks a replica or
    # every replica is full; beyond it they are refused at once with 503. None: one
    # replica's capacity (max_num_seqs + max_waiting).
    max_queued_requests: int | None = None
    # Ray's runtime_env for this pool's replicas (env vars such as NCCL settings, a
    # worker_process_setup_hook, ...).
    runtime_env: dict | None = None
    # Expert parallelism of each replica (cluster/parallel_settings.py). With
    # enable_expert_parallel, num_cpus and num_gpus are per rank.
    parallel: PoolParallel = field(default_factory=PoolParallel)
    # Replicas sized by the SLO policy between bounds (cluster/autoscaling.py); None:
    # `replicas` stays fixed.
    autoscaling: AutoscalingSettings | None = None

    @property
    def max_num_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def actor_options(self) -> dict:
        """The replica actor's resources: an EP replica's actor is the coordinator in
        bundle 0 of its placement group; the ranks take the rest (rank_bundles)."""
        if self.parallel.enable_expert_parallel:
            options = {"num_cpus": COORDINATOR_CPUS, "num_gpus": 0}
        else:
            options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return options

    def rank_bundle(self) -> dict[str, float]:
        """The placement-group bundle of one EP rank."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}

    def placement_group_bundles(self) -> list[dict[str, float]] | None:
        """Serve's placement_group_bundles for an EP replica (None for a plain one):
        bundle 0 the replica actor's, then one per rank."""
        if not self.parallel.enable_expert_parallel:
            return None
        return [{"CPU": COORDINATOR_CPUS}] + [self.rank_bundle() for _ in range(self.parallel.data_parallel_size)]


@dataclass
class AppSettings:
    model: str = "default"
    served_model_name: str | None = None
    mode: str = "pd"                # pd: prefill pool -> decode pool (NIXL); colocated: one pool
    engine: dict = field(default_factory=dict)
    pools: dict[str, PoolSettings] = field(default_factory=dict)
    slo: SLO = field(default_factory=SLO)
    api_key: str | None = None
    kv_transfer: dict = field(default_factory=dict)
    # EPLB of the expert-parallel pools with enable_eplb: eplb.elastic.EplbConfig's fields
    # (window_size, step_interval, min_gain, ...) plus num_redundant_experts (vLLM's --eplb-config).
    eplb: dict = field(default_factory=dict)
    max_waiting: int = 256
    max_body_bytes: int = 4 * 2**20         # larger request bodies get 413 before parsing
    prefill_timeout_s: float = 10.0         # pd: a slower prefill is recomputed on the decode engine
    health_check_period_s: float = 5.0      # how often Serve asks each engine replica for its health
    router_max_ongoing_requests: int = 4096  # far above the pools' capacity: /health never queues

    @property
    def model_name(self) -> str:
        return self.served_model_name or ("tandem-default" if self.model == "default" else self.model)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, **self.engine)

    def kv_connector_spec(self, **settings) -> KVConnectorSpec:
        """The KV connector `kv_transfer` names (NixlConnector by default), with its settings."""
        kv = dict(self.kv_transfer)
        return connector_spec(kv.pop("kv_connector", DEFAULT_CONNECTOR), **kv, **settings)

    def pool(self, name: str) -> PoolSettings:
        return self.pools.get(name, PoolSettings())

    def parallel_config(self, pool: str) -> ParallelConfig:
        return self.pool(pool).parallel.config(pool, self.eplb)

    @property
    def engine_pools(self) -> tuple[str, ...]:
        """The pools that hold engines in this mode."""
        return ("prefill", "decode") if self.mode == "pd" else ("colocated",)

    def check_model(self) -> None:
        """Checks of the expert-parallel pools against the model's config (dense model,
        expert slots that do not split over the ranks), before anything is deployed."""
        from engine.engine_client import resolve_model_path
        from engine.models.loader import load_config

        model_config = None
        for pool in self.engine_pools:
            parallel = self.parallel_config(pool)
            if parallel.enable_expert_parallel:
                model_config = model_config or load_config(resolve_model_path(self.model))
                check_model_fits(pool, parallel, model_config, self.model)


def parse_settings(args: dict | None) -> AppSettings:
    args = dict(args or {})
    known = {f.name for f in fields(AppSettings)}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown app settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    pools = {}
    for name, p in (args.pop("pools", None) or {}).items():
        p = dict(p)
        pools[name] = PoolSettings(parallel=PoolParallel.parse(name, p.pop("parallel", None)),
                                   autoscaling=parse_autoscaling(p.pop("autoscaling", None)), **p)
    slo = SLO(**(args.pop("slo", None) or {}))
    settings = AppSettings(pools=pools, slo=slo, **args)
    if settings.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {settings.mode!r}")
    bad = set(settings.kv_transfer) - set(KV_TRANSFER_KEYS)
    if bad:
        raise ValueError(f"unknown kv_transfer settings: {', '.join(sorted(bad))} (known: {', '.join(KV_TRANSFER_KEYS)})")
    settings.kv_connector_spec()    # an unknown kv_connector is a start-up error
    if settings.eplb:
        from eplb.engine_factory import eplb_settings
        eplb_settings(settings.eplb)            # unknown keys or bad values fail here
    for pool in settings.engine_pools:
        settings.parallel_config(pool)          # dp < 1, EP settings that contradict each other
    if settings.pool("router").autoscaling is not None:
        raise ValueError("autoscaling applies to the engine pools, not to the router: set pools.router.replicas")
    engine_fields = {f.name for f in fields(EngineConfig)} - {"model"}
    bad = set(settings.engine) - engine_fields
    if bad:
        raise ValueError(f"unknown engine settings: {', '.join(sorted(bad))}")
    return settings
