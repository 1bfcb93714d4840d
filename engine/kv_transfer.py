"""The scheduler's KV-transfer hook: how one engine hands a finished prefill's KV blocks
to another (producer) and how an engine takes a prefill computed elsewhere (consumer).

The engine knows only this interface; `disagg/` implements it (NIXL, a side channel,
leases). Requests opt in through `Request.kv_transfer_params` (a KVTransferParams):

- producer: `do_remote_decode`. When the request finishes by length (the prefill's one
  token), the scheduler keeps its blocks (and a hybrid model's state slot, under the
  same lease) and asks the hook to `hold` them; the hook returns a handle, which goes
  back to the caller in the output's `kv_transfer_params` (`do_remote_prefill` and the
  handle: what a consumer needs). The blocks are freed once the hook lists the request
  in `released()` (the consumer read them, or the lease ran out).
- consumer: `do_remote_prefill`, the producer's `handle`, `first_token_ids` [t] and
  `first_logprobs`. The request starts with the producer's first token as
  output. The scheduler allocates local blocks (and a state slot) for the prompt,
  calls `start_load`, and
  admits the request as prefilled when `finished_loads()` reports it done. A failed
  load is recomputed locally or fails the request, by `kv_load_failure_policy`. The
  scheduler stamps `received` (time.monotonic()) into the params on arrival, so the hook
  can tell how much of the producer's lease is left while the request waits for blocks.

Every method is called from the engine-core loop, never concurrently.

A connector is named by a `KVConnectorSpec` (plain data: 'module:Class' and its
settings) and built where the engine core lives: in this process for an EngineCore, in
each rank process for an expert-parallel engine, whose ranks report their observer's
calls back with each step (`RecordedTransfers`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.plugins import load_class
from engine.request import Request

FAILURE_POLICIES = ("recompute", "fail")


class KVTransferFailed(RuntimeError):
    """The KV of a remotely prefilled request could not be loaded (fail policy)."""


class KVTransferHook(ABC):
    # -- producer side ----------------------------------------------------------------
    @abstractmethod
    def hold(self, req: Request, block_ids: list[int], state_slot: int | None = None) -> dict[str, Any]:
        """Keep `block_ids` (the request's KV, `req.num_prompt_tokens` tokens) and, for a
        hybrid model, its Mamba `state_slot` (the state after the prompt) for a
        consumer; returns the handle the consumer needs to read them."""

    @abstractmethod
    def released(self) -> list[str]:
        """Held requests whose blocks may be freed now."""

    # -- consumer side ----------------------------------------------------------------
    @abstractmethod
    def start_load(self, req: Request, block_ids: list[int], num_local_tokens: int,
                   state_slot: int | None = None) -> None:
        """Begin reading the remote KV of `req` into `block_ids` (and, for a hybrid
        model, the producer's state slot into `state_slot`); the first
        `num_local_tokens` tokens are already in local blocks (prefix-cache hits).
        Never raises for a bad handle: the failure is reported by `finished_loads`."""

    @abstractmethod
    def finished_loads(self) -> tuple[list[str], dict[str, str]]:
        """Loads that ended since the last call: (done ids, {failed id: reason}). A load
        is reported only once nothing can write into its blocks any more."""

    @abstractmethod
    def cancel_load(self, req_id: str) -> None:
        """Stop a load (the request was aborted); returns once no write can land in
        its blocks."""

    def close(self) -> None:
        """Release transfer resources (engine shutdown)."""


class TransferObserver(Protocol):
    """Told of every finished or failed load, on the engine thread (metrics)."""

    def transferred(self, nbytes: int, seconds: float, descriptors: int) -> None: ...

    def failed(self, reason: str) -> None:
        """A load failed; under the recompute policy the engine recomputes it at once."""


@dataclass(frozen=True)
class KVConnectorSpec:
    """A connector to build beside an engine core: `connector` is 'package.module:Class'
    whose `Class.for_engine(core, observer=..., **kwargs)` returns the hook. Plain data,
    so an expert-parallel engine sends it to its rank processes."""
    connector: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, core, observer: TransferObserver | None = None) -> KVTransferHook:
        return load_class(self.connector).for_engine(core, observer=observer, **self.kwargs)

    def to_wire(self) -> dict[str, Any]:
        return {"connector": self.connector, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> KVConnectorSpec:
        return cls(d["connector"], dict(d.get("kwargs") or {}))


class RecordedTransfers:
    """An observer for a connector in another process (an EP rank): it records the calls,
    the rank sends them with its step answer and the coordinator replays them onto the
    real observer, so metrics count every rank's transfers."""
    CALLS = ("transferred", "failed")

    def __init__(self) -> None:
        self._calls: list[list] = []

    def transferred(self, nbytes: int, seconds: float, descriptors: int) -> None:
        self._calls.append(["transferred", nbytes, seconds, descriptors])

    def failed(self, reason: str) -> None:
        self._calls.append(["failed", reason])

    def drain(self) -> list[list]:
        calls, self._calls = self._calls, []
        return calls

    @classmethod
    def replay(cls, calls: list[list], observer: TransferObserver | None) -> None:
        for name, *args in calls if observer is not None else ():
            if name in cls.CALLS:
                getattr(observer, name)(*args)


def is_consumer(req: Request) -> bool:
    return req.kv_transfer_params is not None and req.kv_transfer_params.do_remote_prefill


def check_consumer(req: Request, vocab_size: int) -> None:
    """Raise ValueError unless a remote-prefill request carries the producer's first token."""
    first = req.kv_transfer_params.first_token_ids
    if (not isinstance(first, list) or len(first) != 1 or not isinstance(first[0], int)
            or not 0 <= first[0] < vocab_size):
        raise ValueError("a remote-prefill request needs kv_transfer_params.first_token_ids = [token id]")


def is_producer(req: Request) -> bool:
    return req.kv_transfer_params is not None and req.kv_transfer_params.do_remote_decode
