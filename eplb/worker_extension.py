"""EPLB inside each rank of an EPEngine: load statistics and weight migration.

Loaded by name in every rank ('eplb.worker_extension:EplbWorkerExtension'); it reads
the EplbSetup / EplbCommand its controller (eplb/controller.py) puts in the Regroup and
Step messages and answers with an EplbReport (eplb/messages.py).
"""

from __future__ import annotations

from typing import Any

from eplb.load_stats import ExpertLoadWindow
from eplb.messages import EplbCommand, EplbReport, EplbSetup
from eplb.migration import LayerMigration
from eplb.transfer_plan import plan_layer


class EplbWorkerExtension:
    name = "eplb"

    def __init__(self, worker) -> None:
        self.worker = worker
        self.window: ExpertLoadWindow | None = None
        self.migration: LayerMigration | None = None
        self.migrating_layer: int | None = None

    def on_regroup(self, msg, payload: dict[str, Any] | None) -> None:
        self.migration = None     # a regroup happens only between migrations
        if self.window is None:
            setup = EplbSetup.from_wire(payload or {})
            self.window = ExpertLoadWindow(self.worker.moe_layers, setup.window_size)
        else:
            self.window.rebind()

    def on_reset(self) -> None:
        self.migration, self.migrating_layer = None, None   # the staged weights are dropped

    def before_step(self, msg, payload: dict[str, Any] | None) -> None:
        cmd = EplbCommand.from_wire(payload or {})
        if cmd.commit is not None:
            if self.migration is None or self.migrating_layer != cmd.commit:
                raise RuntimeError(f"commit of layer {cmd.commit} without its migration")
            self.migration.commit()
            self.window.rebind()
            self.migration, self.migrating_layer = None, None
        if cmd.migrate_layer is not None:
            moe = self.worker.moe_layers[cmd.migrate_layer]
            ep = self.worker.ep
            transfers = plan_layer(moe.phy2log.tolist(), cmd.migrate_row, ep.slots_per_rank)
            self.migration = LayerMigration(moe, cmd.migrate_row, transfers, ep.rank, self.worker.groups.migration)
            self.migration.start()
            self.migrating_layer = cmd.migrate_layer

    def after_step(self, msg, payload: dict[str, Any] | None) -> dict[str, Any] | None:
        self.window.record()
        cmd = EplbCommand.from_wire(payload or {})
        report = EplbReport()
        if self.migration is not None and cmd.migrate_layer is not None:
            report.bytes_sent = self.migration.bytes_sent
        if cmd.collect:
            logical, physical = self.window.collect(self.worker.groups.dispatch)
            if self.worker.ep.rank == 0:
                report.logical, report.physical = logical.tolist(), physical.tolist()
        return report.to_wire() if report != EplbReport() else None
