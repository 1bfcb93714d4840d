"""What a component that rides along with an EP engine's steps implements (EPLB's
controller, eplb/controller.py, is one). The engine imports no plugin: a plugin is
handed to `EPEngine(plugins=[...])`.

A plugin has a coordinator half (this interface) and a rank half, the worker
extension named by `worker_extension` ('module:Class', built in every rank; see
engine/distributed/ep_worker.py). The two halves talk through the `ext` maps of the
Regroup, Step and StepAnswer messages, under the plugin's `name`, in the plugin's own
message types.
"""

from __future__ import annotations

from typing import Any, Protocol


class EPPlugin(Protocol):
    name: str
    worker_extension: str

    def attach(self, engine) -> None:
        """Once, after the engine formed its first generation."""

    def regroup_payload(self) -> dict[str, Any] | None:
        """What the rank halves get with every Regroup."""

    def step_payload(self, step_index: int) -> dict[str, Any] | None:
        """What the rank halves get with step `step_index` (None: nothing this step)."""

    def on_step(self, step_index: int, reports: dict[str, Any]) -> None:
        """After every step: each rank's report (rank name -> payload; ranks that sent
        none are left out)."""

    def on_group_changed(self) -> None:
        """The engine formed a new generation on its own (a lost rank): whatever the
        plugin had in flight on the ranks is gone."""
