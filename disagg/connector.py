"""What a KV connector provides, whatever carries the bytes (NIXL today), and the
registry that maps a `kv_connector` name (vLLM's setting) to its backend module.

A connector is the engine's KV-transfer hook (engine/kv_transfer.py) over one engine
core's KV cache:
- register: `for_engine(core, observer=..., **settings)` registers the core's KV cache
  (and a hybrid model's state slots) with the transport;
- hand-off params (producer): `hold` keeps a finished prefill's blocks under a lease
  and returns the handle a consumer needs; `released` lists the held requests a reader
  has notified (or whose lease ran out), whose blocks may be freed;
- pull, poll (consumer): `start_load` begins reading a handle's blocks into local ones,
  `finished_loads` reports loads that ended, `cancel_load` stops one;
- notify/free: a reader tells the producer it is done with a hand-off, on success and
  on failure, so the producer frees the blocks before the lease would;
- shutdown: `close`.
The lease bookkeeping is the same for every transport and lives here; a backend says
how handles are made (`_handle`) and which readers have notified (`_reader_notices`).

Backends are named 'module:Class' so the orchestration (prefill_decode.py) and the
ZeroMQ prefill service import no transport package.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from disagg.handle import KVHandle
from engine.kv_transfer import KVConnectorSpec, KVTransferHook, TransferObserver
from engine.request import Request

log = logging.getLogger(__name__)

# kv_connector names (vLLM's spelling) -> backends.
CONNECTORS = {"NixlConnector": "disagg.nixl_connector:NixlConnector"}
DEFAULT_CONNECTOR = "NixlConnector"


def connector_spec(name: str = DEFAULT_CONNECTOR, **settings) -> KVConnectorSpec:
    """The spec of the backend called `name`, with its settings; ValueError names the
    ones available when `name` is unknown."""
    if name not in CONNECTORS:
        raise ValueError(f"kv_connector {name!r} is not available (available: {', '.join(sorted(CONNECTORS))})")
    return KVConnectorSpec(CONNECTORS[name], settings)


class PDObserver(TransferObserver, Protocol):
    """The transfer observer of a decode engine in the pd topology: also told when the
    prefill pool itself failed a request."""

    def prefill_failed(self, recomputed: bool) -> None:
        """The prefill pool failed a request (dead, slow or refusing); `recomputed`: the
        decode engine then computed the prompt itself (False: that failed too)."""


@dataclass
class TransferStats:
    """Running totals the serving layer exports as metrics (it reads the deltas)."""
    bytes_total: int = 0
    descriptors_total: int = 0
    transfers_total: int = 0
    failures: Counter = field(default_factory=Counter)           # reason -> count
    durations: deque = field(default_factory=lambda: deque(maxlen=4096))   # recent loads, seconds


class KVConnector(KVTransferHook):
    """The transport-neutral part of a connector: the producer's leases."""
    engine_id: str      # the name handles give for this connector
    lease_s: float

    def __init__(self, lease_s: float, observer: TransferObserver | None) -> None:
        self.lease_s = lease_s
        self.observer = observer
        self.stats = TransferStats()
        self._held: dict[str, float] = {}               # producer: request id -> lease expiry

    @classmethod
    @abstractmethod
    def for_engine(cls, core, *, observer: TransferObserver | None = None, **settings) -> KVConnector:
        """A connector registered over `core`'s KV cache (and state slots)."""

    @abstractmethod
    def _handle(self, req: Request, block_ids: list[int], state_slot: int | None) -> KVHandle:
        """The handle a consumer reads `req`'s held blocks with."""

    @abstractmethod
    def _reader_notices(self) -> list[str]:
        """Held requests whose readers said they are done since the last call."""

    def hold(self, req: Request, block_ids: list[int], state_slot: int | None = None) -> dict:
        handle = self._handle(req, block_ids, state_slot)
        self._held[req.request_id] = time.monotonic() + self.lease_s
        return handle.to_dict()

    def released(self) -> list[str]:
        out = [rid for rid in self._reader_notices() if self._held.pop(rid, None) is not None]
        now = time.monotonic()
        for rid in [r for r, expiry in self._held.items() if expiry < now]:
            log.warning("KV lease of request %s expired before a reader took it; freeing its blocks", rid)
            del self._held[rid]
            out.append(rid)
        return out

    def _count_transfer(self, nbytes: int, seconds: float, descriptors: int) -> None:
        self.stats.bytes_total += nbytes
        self.stats.transfers_total += 1
        self.stats.durations.append(seconds)
        if self.observer is not None:
            self.observer.transferred(nbytes, seconds, descriptors)

    def _count_failure(self, reason: str) -> None:
        self.stats.failures[reason] += 1
        if self.observer is not None:
            self.observer.failed(reason)
