"""The application's settings: one plain dict (the `args` of config.yaml's application,
or the chart's values), validated into dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cluster.request_metrics import SLO
from engine.config import EngineConfig

MODES = ("colocated", "pd")
# Connector settings an app may set (`kv_transfer:`), with their defaults in disagg.
KV_TRANSFER_KEYS = ("lease_s", "handshake_timeout_s", "transfer_timeout_s")


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

    def actor_options(self) -> dict:
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return options


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

    def pool(self, name: str) -> PoolSettings:
        return self.pools.get(name, PoolSettings())


def parse_settings(args: dict | None) -> AppSettings:
    args = dict(args or {})
    known = {f.name for f in fields(AppSettings)}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown app settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    pools = {name: PoolSettings(**p) for name, p in (args.pop("pools", None) or {}).items()}
    slo = SLO(**(args.pop("slo", None) or {}))
    settings = AppSettings(pools=pools, slo=slo, **args)
    if settings.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {settings.mode!r}")
    bad = set(settings.kv_transfer) - set(KV_TRANSFER_KEYS)
    if bad:
        raise ValueError(f"unknown kv_transfer settings: {', '.join(sorted(bad))} (known: {', '.join(KV_TRANSFER_KEYS)})")
    engine_fields = {f.name for f in fields(EngineConfig)} - {"model"}
    bad = set(settings.engine) - engine_fields
    if bad:
        raise ValueError(f"unknown engine settings: {', '.join(sorted(bad))}")
    return settings
