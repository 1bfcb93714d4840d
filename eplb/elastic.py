"""Elastic expert parallelism: growing or shrinking an EP engine's world while it serves.

`ElasticScaler.scale_to(n)` keeps slots per rank fixed (so the ranks' weight tensors
never change shape) and uses the engine's generation primitives and the EPLB
controller's migrations:
  grow:   start the new rank processes, each loading only its own expert slots (the
          running ranks keep serving while they load), form the larger group with them
          (their slots serve at once), then migrate to the placement recomputed for
          the new size;
  shrink: stop giving the leaving ranks requests, restart their requests on the ranks
          that stay (from prompt + tokens so far, as after a lost rank), migrate to a
          placement over the staying ranks (the leaving ranks' slots empty), wait until
          KV they hold for another engine's reader has been read, then form the smaller
          group and stop the leaving processes.
A bad size, or new ranks that fail to start, leave the running group untouched; a
scale while another runs raises ScaleInProgress.

`ElasticEPEngine` is an EPEngine with the EPLB controller plugged in and this scaler:
the client the "eplb" factory builds (`LLM(..., enable_eplb=True)`).
"""

from __future__ import annotations

import threading

import torch

from engine.config import EngineConfig
from engine.distributed.ep_engine import EPEngine
from engine.layers.expert_map import ExpertMap
from eplb.controller import EplbConfig, EplbController, RebalanceInProgress
from eplb.metrics import EplbStats

__all__ = ["ElasticEPEngine", "ElasticScaler", "EplbConfig", "RebalanceInProgress", "ScaleInProgress",
           "ScaleInterrupted"]


class ScaleInProgress(RuntimeError):
    """A scale was asked for while another one is running (a server answers 409)."""


class ScaleInterrupted(RuntimeError):
    """A rank was lost during scale_to; the engine serves on, with fewer ranks."""


class ElasticScaler:
    def __init__(self, engine: EPEngine, controller: EplbController) -> None:
        self.engine, self.controller = engine, controller
        self._lock = threading.Lock()

    @property
    def scaling(self) -> bool:
        return self._lock.locked()

    def check_size(self, num_ranks: int) -> None:
        """ValueError unless `num_ranks` can serve: an integer >= 1 whose ranks' slots hold
        every expert. Slots per rank stay fixed, so any such size splits the slots evenly
        (the total is num_ranks * slots per rank; extra slots become redundant replicas)."""
        eng = self.engine
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"the new EP size must be an integer >= 1, got {num_ranks!r}")
        if num_ranks * eng.slots_per_rank < eng.num_experts:
            raise ValueError(f"{num_ranks} ranks of {eng.slots_per_rank} expert slots cannot hold "
                             f"{eng.num_experts} experts; scale to at least "
                             f"{-(-eng.num_experts // eng.slots_per_rank)} ranks")

    def scale_to(self, num_ranks: int, load: torch.Tensor | None = None, serve_while_loading: bool = True) -> None:
        """Grow or shrink the EP world to `num_ranks` ranks without dropping requests.
        load: what to balance the new placement for (default: the last window).
        serve_while_loading: keep stepping the current ranks while new ones load the
        model (False pauses them, e.g. to keep requests in flight across the regroup)."""
        if not self._lock.acquire(blocking=False):
            raise ScaleInProgress("a scale of this engine is already running; try again when it is done")
        try:
            self.check_size(num_ranks)
            self.engine._check_usable()
            self.controller.paused = True      # no automatic rebalance while the world changes
            self.controller.finish_migration()
            recoveries = self.engine.num_recoveries
            old = self.engine.world_size
            if num_ranks > old:
                self._grow(num_ranks - old, load, serve_while_loading, recoveries)
            elif num_ranks < old:
                self._shrink(num_ranks, load, recoveries)
        finally:
            self.controller.paused = False
            self._lock.release()

    def _check_no_loss(self, recoveries: int) -> None:
        eng = self.engine
        if eng.num_recoveries != recoveries:
            raise ScaleInterrupted(f"a rank was lost while scaling; the engine serves on {eng.world_size} "
                                   f"ranks now (events: {eng.events[-3:]}); call scale_to again")

    def _grow(self, count: int, load: torch.Tensor | None, serve: bool, recoveries: int) -> None:
        eng = self.engine
        new_ranks, _ = eng.spawn_ranks(count, keep_serving=serve)
        self.controller.finish_migration()   # serving while they loaded may have started one
        self._check_no_loss(recoveries)
        own = torch.tensor([r.slot_experts for r in new_ranks], dtype=torch.long).flatten()
        joined = ExpertMap.from_phy2log(torch.cat([eng.expert_map.phy2log, own.expand(eng.num_moe_layers, -1)], 1),
                                        eng.num_experts)
        eng.regroup(eng.ranks + new_ranks, joined, weights={r.name: "model" for r in new_ranks})
        eng.accepting |= {r.name for r in new_ranks}
        self.controller.migrate_to(self.controller.target(eng.world_size, load))
        self.controller.finish_migration()
        self._check_no_loss(recoveries)

    def _shrink(self, num_ranks: int, load: torch.Tensor | None, recoveries: int) -> None:
        eng = self.engine
        leaving = [r.name for r in eng.ranks[num_ranks:]]
        eng.accepting = (eng.accepting - set(leaving)) or {r.name for r in eng.ranks[:num_ranks]}
        eng.move_requests(leaving)
        self.controller.migrate_to(self.controller.target(num_ranks, load))
        self.controller.finish_migration()
        while any(eng.holds_kv_on(n) for n in leaving):     # finished prefills' KV: until read
            eng.step_internal()
        self._check_no_loss(recoveries)
        keep = eng.ranks[:num_ranks]
        eng.regroup(keep, eng.expert_map.resized(num_ranks * eng.slots_per_rank))
        eng.retire(leaving)


class ElasticEPEngine(EPEngine):
    """An EP engine with the EPLB controller (`eplb_controller`) and elastic scaling;
    adds `rebalance`, `scale_to`, `stats` (EplbStats) and `migrating` to EPEngine."""

    def __init__(self, config: EngineConfig, ep_size: int, *, eplb: EplbConfig | None = None, **kwargs) -> None:
        self.eplb_controller = EplbController(eplb)
        plugins = (self.eplb_controller, *kwargs.pop("plugins", ()))
        super().__init__(config, ep_size, plugins=plugins, **kwargs)
        self.scaler = ElasticScaler(self, self.eplb_controller)

    @property
    def eplb(self) -> EplbConfig:
        return self.eplb_controller.config

    @property
    def stats(self) -> EplbStats:
        return self.eplb_controller.stats

    @property
    def last_load(self) -> torch.Tensor | None:
        return self.eplb_controller.last_load

    @property
    def migrating(self) -> bool:
        return self.eplb_controller.migrating

    def rebalance(self, load: torch.Tensor | None = None, *, force: bool = True, wait: bool = True) -> bool:
        """The forced rebalance (see EplbController.rebalance); ScaleInProgress during a scale."""
        if self.scaler.scaling:
            raise ScaleInProgress("the engine is scaling; rebalance after the scale (it rebalances itself)")
        return self.eplb_controller.rebalance(load, force=force, wait=wait)

    def scale_to(self, num_ranks: int, load: torch.Tensor | None = None, serve_while_loading: bool = True) -> None:
        self.scaler.scale_to(num_ranks, load, serve_while_loading)
