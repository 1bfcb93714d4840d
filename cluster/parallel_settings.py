"""A pool's expert-parallel settings (`pools.<name>.parallel`, vLLM's words) and the
checks that can be made against the model before anything is deployed.

An EP replica is one Serve replica whose ranks are Ray actors in the replica's own
placement group: bundle 0 holds the replica actor (the coordinator, which runs no
kernels), bundles 1..N one rank each with the pool's num_cpus and num_gpus.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from engine.engine_client import ParallelConfig, routed_experts

PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
# The replica actor of an EP pool only schedules and passes messages; Ray refuses a
# bundle of zero resources, so it holds a small CPU share.
COORDINATOR_CPUS = 0.1


@dataclass
class PoolParallel:
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_eplb: bool = False
    # None: DeepEP's split, "normal" in prefill and colocated pools, "low_latency" in
    # decode pools.
    ep_dispatch: str | None = None
    # Ray placement group strategy of one replica's bundles: PACK (default) packs the
    # ranks onto as few nodes as fit, STRICT_PACK keeps them on one node (NVLink).
    placement_strategy: str = "PACK"

    @classmethod
    def parse(cls, pool: str, raw: dict | PoolParallel | None) -> PoolParallel:
        if isinstance(raw, PoolParallel):
            return raw
        raw = dict(raw or {})
        known = [f.name for f in fields(cls)]
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(f"pools.{pool}.parallel: unknown keys {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(known)})")
        parallel = cls(**raw)
        if parallel.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"pools.{pool}.parallel.placement_strategy must be one of "
                             f"{', '.join(PLACEMENT_STRATEGIES)}, got {parallel.placement_strategy!r}")
        return parallel

    def config(self, pool: str, eplb: dict) -> ParallelConfig:
        """The engine's ParallelConfig for a replica of `pool`; `eplb`: the app's
        `eplb` settings (EplbConfig fields + num_redundant_experts)."""
        dispatch = self.ep_dispatch or ("low_latency" if pool == "decode" else "normal")
        try:
            return ParallelConfig(self.data_parallel_size, self.enable_expert_parallel, self.enable_eplb,
                                  dispatch, dict(eplb) if self.enable_expert_parallel else {})
        except ValueError as e:
            raise ValueError(f"pools.{pool}.parallel: {e}") from None


def check_model_fits(pool: str, parallel: ParallelConfig, model_config, model: str) -> None:
    """Refuse, with what to change, an EP pool the model cannot be split over."""
    if not parallel.enable_expert_parallel:
        return
    experts = routed_experts(model_config)
    if experts is None:
        raise ValueError(f"pools.{pool}.parallel.enable_expert_parallel: model {model!r} is dense (its config "
                         "names no routed experts); expert parallelism needs an MoE model. Set "
                         "enable_expert_parallel: false and use more replicas instead")
    dp = parallel.data_parallel_size
    redundant = parallel.eplb_config.get("num_redundant_experts", 0)
    if not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"eplb.num_redundant_experts must be an integer >= 0, got {redundant!r}")
    if redundant > experts * (dp - 1):
        raise ValueError(f"eplb.num_redundant_experts={redundant} is too large for pool {pool}: {dp} ranks hold "
                         f"{experts} experts + {redundant} redundant slots, so a rank would hold one expert "
                         f"twice; use at most {experts * (dp - 1)} (experts x (data_parallel_size - 1))")
    if (experts + redundant) % dp:
        fits = [n for n in range(1, experts + redundant + 1) if (experts + redundant) % n == 0]
        raise ValueError(f"pools.{pool}.parallel.data_parallel_size={dp} does not divide the {experts + redundant} "
                         f"expert slots ({experts} experts + {redundant} redundant) of model {model!r}; use one "
                         f"of {fits}, or change eplb.num_redundant_experts so the slots split evenly")
