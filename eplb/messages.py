"""EPLB's messages between its controller (coordinator) and its rank halves, carried in
the EP messages' `ext` maps under "eplb" (engine/distributed/protocol.py): one
dataclass and one msgpack encoding each."""

from __future__ import annotations

from dataclasses import dataclass

from engine.distributed.protocol import Message


@dataclass
class EplbSetup(Message):
    """With every Regroup: how many steps of load each rank keeps."""
    window_size: int = 128


@dataclass
class EplbCommand(Message):
    """With a Step. collect: all-reduce the load windows now (every rank at the same
    step), rank 0 reports the totals. commit: finish that layer's migration and swap its
    map before the forward. migrate_layer/migrate_row: start moving that layer's weights
    to the map `migrate_row` (its forward still uses the old map)."""
    collect: bool = False
    commit: int | None = None
    migrate_layer: int | None = None
    migrate_row: list[int] | None = None


@dataclass
class EplbReport(Message):
    """A rank's answer: bytes it sent for a migration started this step; with collect,
    rank 0's load totals (logical [layers, experts] over the window, physical [layers,
    slots] since the last collection)."""
    bytes_sent: int = 0
    logical: list[list[int]] | None = None
    physical: list[list[int]] | None = None
