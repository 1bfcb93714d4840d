"""The EPLB controller: a plug-in of the EP engine (engine/distributed/ep_plugin.py).

It reads the ranks' expert-load counters, decides whether a new placement is worth it,
plans it and commits it through the engine's expert-map interface. Every
`step_interval` steps (by the engine's step index, so all ranks agree) the ranks
all-reduce their load windows; when the projected balancedness gain is at least
`min_gain` the controller migrates one MoE layer per step: step n starts moving layer
i's weights (point-to-point, into staging buffers) and runs its forward on the old map;
step n+1 commits layer i (weights, then map) before its forward and starts layer i+1.
Requests keep running throughout. Its rank half is eplb/worker_extension.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.layers.expert_map import ExpertMap
from eplb.messages import EplbCommand, EplbReport, EplbSetup
from eplb.metrics import EplbStats
from eplb.planner import (
    measured_balancedness,
    placement_balancedness,
    rank_loads,
    target_placement,
)

EXTENSION = "eplb.worker_extension:EplbWorkerExtension"


class RebalanceInProgress(RuntimeError):
    """A rebalance was asked for while another one is moving weights."""


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


class EplbController:
    name = "eplb"
    worker_extension = EXTENSION

    def __init__(self, config: EplbConfig | None = None) -> None:
        self.config = config or EplbConfig()
        self.stats = EplbStats()
        self.engine = None
        self.last_load: torch.Tensor | None = None        # logical load [layers, experts], last window
        self.paused = False            # no automatic rebalance (the world is changing)
        self._queue: deque[tuple[int, list[int]]] = deque()
        self._migrating: tuple[int, list[int]] | None = None
        self._committing: tuple[int, list[int]] | None = None
        self._rebalance_started: float | None = None
        self._step_started: float | None = None

    # -- EPPlugin -----------------------------------------------------------------------
    def attach(self, engine) -> None:
        self.engine = engine

    def regroup_payload(self) -> dict:
        return EplbSetup(self.config.window_size).to_wire()

    def step_payload(self, step_index: int) -> dict | None:
        cmd = EplbCommand()
        if self._migrating is not None:
            cmd.commit = self._migrating[0]
            self._committing, self._migrating = self._migrating, None
        if self._queue:
            layer, row = self._queue.popleft()
            cmd.migrate_layer, cmd.migrate_row = layer, row
            self._migrating = (layer, row)
        cmd.collect = (step_index + 1) % self.config.step_interval == 0
        self._step_started = time.perf_counter()
        return cmd.to_wire() if cmd != EplbCommand() else None

    def on_step(self, step_index: int, reports: dict[str, dict]) -> None:
        moving = self._committing is not None
        if self._step_started is not None:
            self.stats.record_step(time.perf_counter() - self._step_started, migrating=moving or self.migrating)
        if self._committing is not None:
            self.engine.commit_layer_map(*self._committing)
            self._committing = None
        if self._rebalance_started is not None and not self.migrating:
            self.stats.add_rebalance(time.perf_counter() - self._rebalance_started)
            self._rebalance_started = None
        parsed = [EplbReport.from_wire(r) for r in reports.values()]
        self.stats.add_bytes_moved(sum(r.bytes_sent for r in parsed))
        totals = next((r for r in parsed if r.logical is not None), None)
        if totals is not None:
            self.last_load = torch.tensor(totals.logical, dtype=torch.float64)
            physical = torch.tensor(totals.physical)
            self.stats.set_load(measured_balancedness(physical, self.engine.world_size),
                                rank_loads(physical, self.engine.world_size))
            if self.config.auto_rebalance and not self.migrating and not self.paused:
                self.rebalance(force=False, wait=False)

    def on_group_changed(self) -> None:
        # A lost rank interrupted whatever was moving; the maps are what was committed.
        self._queue.clear()
        self._migrating = self._committing = None
        self._rebalance_started = None

    # -- decisions ----------------------------------------------------------------------
    @property
    def migrating(self) -> bool:
        return bool(self._queue) or self._migrating is not None or self._committing is not None

    def rebalance(self, load: torch.Tensor | None = None, *, force: bool = True, wait: bool = True) -> bool:
        """Move to a placement balanced for `load` [layers, logical experts] (default: the
        last aggregated window). Without force, only if the projected gain is at least
        min_gain. With wait, step until every layer is committed. Returns whether a
        migration was started; RebalanceInProgress if one is moving."""
        if self.migrating:
            raise RebalanceInProgress("a rebalance is already in progress")
        load = self.load_or_uniform(load)
        eng = self.engine
        new = self.target(eng.world_size, load)
        if not force:
            current = eng.expert_map
            complete = not bool((current.phy2log < 0).any())   # else slots sit empty: any full map is better
            before = placement_balancedness(load, current.phy2log, eng.world_size).mean().item() if complete else 0.0
            after = placement_balancedness(load, new.phy2log, eng.world_size).mean().item()
            if after - before < self.config.min_gain:
                return False
        started = self.migrate_to(new)
        if wait:
            self.finish_migration()
        return started

    def target(self, num_ranks: int, load: torch.Tensor | None = None) -> ExpertMap:
        """The map to move to for `num_ranks` ranks (the first ones of the current group),
        balanced for `load` (default: the last window)."""
        eng = self.engine
        phy2log = target_placement(self.load_or_uniform(load), num_ranks, eng.slots_per_rank, eng.expert_map.phy2log,
                                   self.config.num_groups)
        return ExpertMap.from_phy2log(phy2log, eng.num_experts)

    def load_or_uniform(self, load: torch.Tensor | None) -> torch.Tensor:
        eng = self.engine
        if load is None:
            load = self.last_load
        if load is None:
            load = torch.ones(eng.num_moe_layers, eng.num_experts, dtype=torch.float64)
        load = torch.as_tensor(load, dtype=torch.float64)
        if tuple(load.shape) != (eng.num_moe_layers, eng.num_experts):
            raise ValueError(f"load must have shape ({eng.num_moe_layers}, {eng.num_experts}) "
                             f"[MoE layers, logical experts], got {tuple(load.shape)}")
        return load

    def migrate_to(self, new: ExpertMap) -> bool:
        """Queue the layers whose map differs from the engine's; they move one per step."""
        current = self.engine.expert_map.phy2log
        for layer in range(new.num_layers):
            if not torch.equal(new.phy2log[layer], current[layer]):
                self._queue.append((layer, new.phy2log[layer].tolist()))
        if self._queue:
            self._rebalance_started = time.perf_counter()
        return bool(self._queue)

    def finish_migration(self) -> None:
        while self.migrating:
            self.engine.step_internal()
