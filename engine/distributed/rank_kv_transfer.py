"""KV hand-off on an EP rank: each rank process runs its own connector over its own KV
cache (for NIXL: its own agent and side channel), so a request handed to a rank is
loaded (consumer) or held (producer) there, and the handle a prefill returns names that
rank's connector. The coordinator sends the connector's spec; the rank builds it.

What the rank tells the coordinator with each step answer: the observer calls its
connector made (bytes, seconds, failures: the coordinator replays them onto the
replica's metrics) and whether it holds blocks for a reader (then the coordinator keeps
stepping, so the connector polls for the reader's notice or the lease's end).

A connector that serves on an address (`host`) binds this rank's own: the ranks of one
engine may sit on other nodes than the coordinator that named the address.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

from engine.core.engine_core import EngineCore
from engine.kv_transfer import KVConnectorSpec, RecordedTransfers


class RankKVTransfer:
    def __init__(self, core: EngineCore, spec: dict[str, Any], coordinator_host: str) -> None:
        self.core = core
        self.calls = RecordedTransfers()
        spec = KVConnectorSpec.from_wire(spec)
        if "host" in spec.kwargs:
            spec = replace(spec, kwargs={**spec.kwargs, "host": address_toward(coordinator_host)})
        self.hook = spec.build(core, observer=self.calls)
        core.set_kv_transfer(self.hook)

    def step_answer(self) -> dict[str, Any]:
        return {"kv_calls": self.calls.drain(), "kv_held": len(self.core.scheduler.held)}

    def close(self) -> None:
        self.hook.close()


def address_toward(host: str) -> str:
    """This node's address on the route to `host` (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]
