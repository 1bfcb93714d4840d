"""The EP engine with EPLB: live rebalancing and elastic scaling.

`ElasticEPEngine` is an `EPEngine` whose ranks load `EplbWorkerExtension`. Every
`step_interval` steps (by the coordinator's step index, so all ranks agree) the ranks
all-reduce their load windows; the coordinator computes a placement and, when the
projected balancedness gain is at least `min_gain`, migrates one MoE layer per step:
step n starts moving layer i's weights (point-to-point, into staging buffers) and runs
its forward on the old map; step n+1 commits layer i (weights, then map) before its
forward and starts layer i+1. Requests keep running throughout.

`scale_to(n)` changes the number of ranks with slots per rank fixed:
  grow:   start the new rank processes (the old ranks keep serving while they load),
          form the larger group with the new ranks' slots empty, then migrate to a
          placement over all ranks; new ranks take requests at once.
  shrink: stop giving the leaving ranks requests, migrate to a placement that leaves
          their slots empty, let their requests finish, then form the smaller group
          and stop them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.distributed.ep_engine import EPEngine
from eplb.metrics import EplbStats
from eplb.planner import measured_balancedness, placement_balancedness, target_placement

EXTENSION = "eplb.worker_extension:EplbWorkerExtension"


class ScaleInterrupted(RuntimeError):
    """A rank was lost during scale_to; the engine serves on, with fewer ranks."""


@dataclass
class EplbConfig:
    window_size: int = 128        # steps of load history each rank keeps
    step_interval: int = 64       # aggregate (and maybe rebalance) every this many steps
    min_gain: float = 0.05        # rebalance only if mean balancedness rises by this much
    auto_rebalance: bool = True
    num_groups: int = 1           # expert groups of the model (policy input)

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.step_interval < 1:
            raise ValueError("window_size and step_interval must be >= 1")
        if not 0.0 <= self.min_gain <= 1.0:
            raise ValueError(f"min_gain must be in [0, 1], got {self.min_gain}")


class ElasticEPEngine(EPEngine):
    def __init__(self, config: EngineConfig, ep_size: int, *, eplb: EplbConfig | None = None, **kwargs) -> None:
        self.eplb = eplb or EplbConfig()
        self.stats = EplbStats()
        self.last_load: torch.Tensor | None = None        # logical load [layers, experts], last window
        self._queue: deque[tuple[int, list[int]]] = deque()
        self._migrating: tuple[int, list[int]] | None = None
        self._committing: tuple[int, list[int]] | None = None
        self._rebalance_started: float | None = None
        self._scaling = False          # no automatic rebalance while the world changes
        extensions = tuple(kwargs.pop("extensions", ())) + (EXTENSION,)
        super().__init__(config, ep_size, extensions=extensions, **kwargs)

    # -- hooks of EPEngine --------------------------------------------------------------
    def _regroup_fields(self) -> dict:
        return {"eplb_window": self.eplb.window_size}

    def _step_fields(self, step_index: int) -> dict:
        cmd: dict = {}
        if self._migrating is not None:
            cmd["commit"] = self._migrating[0]
            self._committing, self._migrating = self._migrating, None
        if self._queue:
            layer, row = self._queue.popleft()
            cmd["migrate"] = {"layer": layer, "row": row}
            self._migrating = (layer, row)
        if (step_index + 1) % self.eplb.step_interval == 0:
            cmd["collect"] = True
        return {"eplb": cmd} if cmd else {}

    def _on_step_answers(self, step_index: int, answers: dict[str, dict]) -> None:
        if self._committing is not None:
            layer, row = self._committing
            self.phy2log[layer] = torch.tensor(row)
            self._committing = None
        if self._rebalance_started is not None and not self.migrating:
            self.stats.add_rebalance(time.perf_counter() - self._rebalance_started)
            self._rebalance_started = None
        self.stats.add_bytes_moved(sum(a.get("eplb_bytes_sent", 0) for a in answers.values()))
        load = answers.get(self.ranks[0].name, {}).get("eplb_load")
        if load is not None:
            self.last_load = torch.tensor(load["logical"], dtype=torch.float64)
            self.stats.set_balancedness(measured_balancedness(torch.tensor(load["physical"]), self.world_size))
            if self.eplb.auto_rebalance and not self.migrating and not self._scaling:
                self.rebalance(force=False, wait=False)

    def _on_regrouped(self) -> None:
        # A lost rank interrupted whatever was moving; the maps are what was committed.
        self._queue.clear()
        self._migrating = self._committing = None
        self._rebalance_started = None

    # -- rebalancing ----------------------------------------------------------------------
    @property
    def migrating(self) -> bool:
        return bool(self._queue) or self._migrating is not None or self._committing is not None

    def rebalance(self, load: torch.Tensor | None = None, *, force: bool = True, wait: bool = True) -> bool:
        """Move to a placement balanced for `load` [layers, logical experts] (default: the
        last aggregated window). Without force, only if the projected gain is at least
        min_gain. With wait, step until every layer is committed. Returns whether a
        migration was started."""
        if self.migrating:
            raise RuntimeError("a rebalance is already in progress")
        load = self._load_or_uniform(load)
        new = target_placement(load, self.world_size, self.slots_per_rank, self.phy2log, self.eplb.num_groups)
        if not force:
            complete = bool((self.phy2log >= 0).all())   # else slots sit empty: any full map is better
            before = placement_balancedness(load, self.phy2log, self.world_size).mean().item() if complete else 0.0
            after = placement_balancedness(load, new, self.world_size).mean().item()
            if after - before < self.eplb.min_gain:
                return False
        started = self._enqueue(new)
        if wait:
            self._finish_migration()
        return started

    def _load_or_uniform(self, load: torch.Tensor | None) -> torch.Tensor:
        if load is None:
            load = self.last_load
        if load is None:
            load = torch.ones(self.num_moe_layers, self.num_experts, dtype=torch.float64)
        load = torch.as_tensor(load, dtype=torch.float64)
        if tuple(load.shape) != (self.num_moe_layers, self.num_experts):
            raise ValueError(f"load must have shape ({self.num_moe_layers}, {self.num_experts}) "
                             f"[MoE layers, logical experts], got {tuple(load.shape)}")
        return load

    def _enqueue(self, new: torch.Tensor) -> bool:
        for layer in range(self.num_moe_layers):
            if not torch.equal(new[layer], self.phy2log[layer]):
                self._queue.append((layer, new[layer].tolist()))
        if self._queue:
            self._rebalance_started = time.perf_counter()
        return bool(self._queue)

    def _finish_migration(self) -> None:
        while self.migrating:
            self._step_internal()

    # -- elastic scaling ------------------------------------------------------------------
    def scale_to(self, num_ranks: int, load: torch.Tensor | None = None, serve_while_loading: bool = True) -> None:
        """Grow or shrink the EP world to `num_ranks` ranks without dropping requests.
        load: what to balance the new placement for (default: the last window).
        serve_while_loading: keep stepping the current ranks while new ones load the
        model (False pauses them, e.g. to keep requests in flight across the regroup)."""
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        if num_ranks * self.slots_per_rank < self.num_experts:
            raise ValueError(f"{num_ranks} ranks of {self.slots_per_rank} slots cannot hold "
                             f"{self.num_experts} experts")
        self._finish_migration()
        old = self.world_size
        self._recoveries_at_start = self.num_recoveries
        self._scaling = True
        try:
            if num_ranks > old:
                self._grow(num_ranks - old, load, serve_while_loading)
            elif num_ranks < old:
                self._shrink(num_ranks, load)
        finally:
            self._scaling = False

    def _check_no_loss(self) -> None:
        if self.num_recoveries != self._recoveries_at_start:
            raise ScaleInterrupted(f"a rank was lost while scaling; the engine serves on {self.world_size} "
                                   f"ranks now (events: {self.events[-3:]}); call scale_to again")

    def _grow(self, count: int, load: torch.Tensor | None, serve: bool) -> None:
        new_ranks, _ = self._spawn(count, keep_serving=serve)
        self._finish_migration()   # serving while they loaded may have started one
        self._check_no_loss()
        empty = torch.full((self.num_moe_layers, count * self.slots_per_rank), -1, dtype=torch.long)
        self._regroup(self.ranks + new_ranks, torch.cat([self.phy2log, empty], dim=1),
                      weights={r.name: "none" for r in new_ranks})
        self.accepting |= {r.name for r in new_ranks}
        target = target_placement(self._load_or_uniform(load), self.world_size, self.slots_per_rank,
                                  self.phy2log, self.eplb.num_groups)
        self._enqueue(target)
        self._finish_migration()
        self._check_no_loss()

    def _shrink(self, num_ranks: int, load: torch.Tensor | None) -> None:
        leaving = [r.name for r in self.ranks[num_ranks:]]
        self.accepting -= set(leaving)
        target = target_placement(self._load_or_uniform(load), num_ranks, self.slots_per_rank,
                                  self.phy2log, self.eplb.num_groups)
        self._enqueue(target)
        self._finish_migration()
        while any(self.num_unfinished_on(n) or self.holds_kv_on(n) for n in leaving):   # held KV: until read
            self._step_internal()
        self._check_no_loss()
        keep = self.ranks[:num_ranks]
        self._regroup(keep, self.phy2log[:, :num_ranks * self.slots_per_rank])
        self._retire(leaving)
