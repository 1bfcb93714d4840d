"""EPLB inside each rank of an EPEngine: load statistics and weight migration.

Loaded by name in every rank ('eplb.worker_extension:EplbWorkerExtension'). The
coordinator's step messages carry an "eplb" map:
  collect: true      -> all-reduce the load window now (every rank gets it at the same
                        step); rank 0 returns the totals;
  commit: layer      -> finish that layer's migration and swap its map, before the forward;
  migrate: {layer, row} -> start moving that layer's weights to the new map `row`.
Messages also carry "eplb_window" once (in regroup) to size the window.
"""

from __future__ import annotations

from typing import Any

from eplb.load_stats import ExpertLoadWindow
from eplb.migration import LayerMigration
from eplb.transfer_plan import plan_layer

DEFAULT_WINDOW = 128


class EplbWorkerExtension:
    def __init__(self, worker) -> None:
        self.worker = worker
        self.window: ExpertLoadWindow | None = None
        self.migration: LayerMigration | None = None
        self.migrating_layer: int | None = None

    def on_regroup(self, msg: dict[str, Any]) -> None:
        self.migration = None     # a regroup happens only between migrations
        if self.window is None:
            self.window = ExpertLoadWindow(self.worker.moe_layers, int(msg.get("eplb_window", DEFAULT_WINDOW)))
        else:
            self.window.rebind()

    def on_reset(self, msg: dict[str, Any]) -> None:
        self.migration, self.migrating_layer = None, None   # the staged weights are dropped

    def before_step(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("eplb") or {}
        if "commit" in cmd:
            if self.migration is None or self.migrating_layer != cmd["commit"]:
                raise RuntimeError(f"commit of layer {cmd['commit']} without its migration")
            self.migration.commit()
            self.window.rebind()
            self.migration, self.migrating_layer = None, None
        if "migrate" in cmd:
            layer, row = cmd["migrate"]["layer"], cmd["migrate"]["row"]
            moe = self.worker.moe_layers[layer]
            ep = self.worker.ep
            transfers = plan_layer(moe.phy2log.tolist(), row, ep.slots_per_rank)
            self.migration = LayerMigration(moe, row, transfers, ep.rank, self.worker.groups.migration)
            self.migration.start()
            self.migrating_layer = layer

    def after_step(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.window.record()
        answer: dict[str, Any] = {}
        if self.migration is not None and "migrate" in (msg.get("eplb") or {}):
            answer["eplb_bytes_sent"] = self.migration.bytes_sent
        if (msg.get("eplb") or {}).get("collect"):
            logical, physical = self.window.collect(self.worker.groups.dispatch)
            if self.worker.ep.rank == 0:
                answer["eplb_load"] = {"logical": logical.tolist(), "physical": physical.tolist()}
        return answer
