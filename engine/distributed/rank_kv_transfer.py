"""KV hand-off on an EP rank: each rank process runs its own connector over its own KV
cache (for NIXL: its own agent and side channel), so a request handed to a rank is
loaded (consumer) or held (producer) there, and the handle a prefill returns names that
rank's connector. The coordinator sends the connector's spec; the rank builds it.

What the rank tells the coordinator with each step answer: the observer calls its
connector made (bytes, seconds, failures: the coordinator replays them onto the
replica's metrics) and whether it holds blocks for a reader (then the coordinator keeps
stepping, so the connector polls for the reader's notice or the lease's end).
"""

from __future__ import annotations

from typing import Any

from engine.core.engine_core import EngineCore
from engine.kv_transfer import KVConnectorSpec, RecordedTransfers


class RankKVTransfer:
    def __init__(self, core: EngineCore, spec: dict[str, Any]) -> None:
        self.core = core
        self.calls = RecordedTransfers()
        self.hook = KVConnectorSpec.from_wire(spec).build(core, observer=self.calls)
        core.set_kv_transfer(self.hook)

    def step_answer(self) -> dict[str, Any]:
        return {"kv_calls": self.calls.drain(), "kv_held": len(self.core.scheduler.held)}

    def close(self) -> None:
        self.hook.close()
