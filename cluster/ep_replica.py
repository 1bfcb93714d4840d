"""What an engine replica does when its pool is expert-parallel: build the EP engine
with its ranks as Ray actors in the replica's placement group, send the engine's EPLB
numbers to the replica's metrics, and grow, shrink or rebalance the engine on request
(the router's /scale_elastic_ep and /rebalance_experts).

Answers are plain dicts {"status", "message", ...}, never exceptions, so the router
turns them into HTTP answers in OpenAI's error shape without unpickling anything.
"""

from __future__ import annotations

import asyncio
import logging

from ray.util import get_node_ip_address

from cluster.ep_ranks import NotEnoughResources, RayRankLauncher
from cluster.settings import AppSettings
from disagg.prefill_decode import PrefillDecodeEngine
from engine.async_engine import AsyncEngine
from engine.engine_client import ParallelConfig
from eplb.elastic import RebalanceInProgress, ScaleInProgress

log = logging.getLogger(__name__)
RESERVE_TIMEOUT_S = 30.0    # how long a scale-up waits for Ray to place the new ranks


def replica_parallel(settings: AppSettings, pool: str) -> ParallelConfig:
    """The pool's ParallelConfig, with the ranks placed as Ray actors (in this replica's
    placement group) and reaching the coordinator at this node's address."""
    parallel = settings.parallel_config(pool)
    if not parallel.enable_expert_parallel:
        return parallel
    if parallel.enable_eplb:
        import eplb  # noqa: F401  (registers the EPLB engine client)
    parallel.launcher = RayRankLauncher(strategy=settings.pool(pool).parallel.placement_strategy)
    parallel.host = get_node_ip_address()     # routable from the ranks' nodes, unlike localhost
    return parallel


def loop_engine(engine: AsyncEngine | PrefillDecodeEngine) -> AsyncEngine:
    """The AsyncEngine whose loop drives a replica's engine client (a decode replica's
    PrefillDecodeEngine wraps one)."""
    return engine.decode if isinstance(engine, PrefillDecodeEngine) else engine


def forward_eplb_metrics(engine: AsyncEngine | PrefillDecodeEngine, metrics) -> None:
    """The EPLB controller's numbers (tandem_eplb_*) into the replica's metrics, hence
    its /metrics snapshot and Ray's pipeline."""
    stats = getattr(loop_engine(engine).core, "stats", None)
    if stats is not None and hasattr(stats, "forward_to"):
        stats.forward_to(metrics)


def _rebalance_now(client) -> bool:
    """Finish an automatic rebalance still moving (an idle engine takes no steps to
    finish it), then move to the placement balanced for the last load window."""
    client.eplb_controller.finish_migration()
    return client.rebalance(force=True, wait=True)


def _answer(status: int, message: str, **extra) -> dict:
    return {"status": status, "message": message, **extra}


class ElasticEP:
    """Methods of an engine replica (mixed into cluster.pools.EngineReplica) that change
    its EP engine while it serves; the engine runs them on its loop thread between steps."""
    engine: AsyncEngine | PrefillDecodeEngine
    _ep_busy: str | None = None     # "scale" or "rebalance" while one runs

    def _elastic_client(self):
        core = loop_engine(self.engine).core
        return core if hasattr(core, "scale_to") else None

    def is_scaling_elastic_ep(self) -> bool:
        return self._ep_busy == "scale"

    async def scale_elastic_ep(self, new_data_parallel_size: int) -> dict:
        client = self._elastic_client()
        if client is None:
            return _answer(400, "this pool's engines are not elastic: set parallel.enable_expert_parallel and "
                                "parallel.enable_eplb on the pool")
        n = new_data_parallel_size
        if self._ep_busy is not None:
            return _answer(409, f"a {self._ep_busy} of this engine is in progress; retry when it is done")
        try:
            client.scaler.check_size(n)         # a size < 1, or too few slots for the experts
        except ValueError as e:
            return _answer(400, str(e))
        self._ep_busy = "scale"
        launcher = client.launcher
        try:
            if n > client.world_size:
                try:
                    await asyncio.to_thread(launcher.reserve, n - client.world_size, RESERVE_TIMEOUT_S)
                except NotEnoughResources as e:
                    return _answer(400, f"cannot scale to {n} ranks: {e}")
            before = client.world_size
            try:
                await loop_engine(self.engine).run_in_loop(lambda c: c.scale_to(n))
            except ValueError as e:
                return _answer(400, str(e))
            except ScaleInProgress as e:
                return _answer(409, str(e))
            except RuntimeError as e:
                log.exception("scaling the EP engine from %d to %d ranks failed", before, n)
                return _answer(500, f"scaling failed: {e}; the engine serves on {client.world_size} ranks")
            return _answer(200, f"Scaled to {client.world_size} data parallel engines",
                           data_parallel_size=client.world_size)
        finally:
            launcher.cancel_reservation()
            self._ep_busy = None

    async def rebalance_experts(self) -> dict:
        client = self._elastic_client()
        if client is None:
            return _answer(400, "this pool's engines have no EPLB: set parallel.enable_expert_parallel and "
                                "parallel.enable_eplb on the pool")
        if self._ep_busy is not None:
            return _answer(409, f"a {self._ep_busy} of this engine is in progress; retry when it is done")
        self._ep_busy = "rebalance"
        try:
            try:
                moved = await loop_engine(self.engine).run_in_loop(_rebalance_now)
            except (ScaleInProgress, RebalanceInProgress) as e:
                return _answer(409, str(e))
            balancedness = list(client.stats.balancedness)
            return _answer(200, "rebalanced" if moved else "the placement is already balanced for the last load",
                           rebalanced=bool(moved), balancedness=balancedness)
        finally:
            self._ep_busy = None
