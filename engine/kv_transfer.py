"""The scheduler's KV-transfer hook: how one engine hands a finished prefill's KV blocks
to another (producer) and how an engine takes a prefill computed elsewhere (consumer).

The engine knows only this interface; `disagg/` implements it (NIXL, a side channel,
leases). Requests opt in through `Request.kv_transfer_params`:

- producer: `{"do_remote_decode": True}`. When the request finishes by length (the
  prefill's one token), the scheduler keeps its blocks (and a hybrid model's state
  slot, under the same lease) and asks the hook to `hold` them; the hook returns a handle that goes back to the caller in the output's
  `kv_transfer_params`. The blocks are freed once the hook lists the request in
  `released()` (the consumer read them, or the lease ran out).
- consumer: `{"do_remote_prefill": True, "handle": {...}, "first_token_ids": [t],
  "first_logprobs": [...]}`. The request starts with the producer's first token as
  output. The scheduler allocates local blocks (and a state slot) for the prompt,
  calls `start_load`, and
  admits the request as prefilled when `finished_loads()` reports it done. A failed
  load is recomputed locally or fails the request, by `kv_load_failure_policy`. The
  scheduler stamps `received` (time.monotonic()) into the params on arrival, so the hook
  can tell how much of the producer's lease is left while the request waits for blocks.

Every method is called from the engine-core loop, never concurrently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from engine.request import Request

FAILURE_POLICIES = ("recompute", "fail")


class KVTransferFailed(RuntimeError):
    """The KV of a remotely prefilled request could not be loaded (fail policy)."""


class KVTransferHook(ABC):
    # -- producer side ----------------------------------------------------------------
    @abstractmethod
    def hold(self, req: Request, block_ids: list[int], state_slot: int | None = None) -> dict:
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


def is_consumer(req: Request) -> bool:
    return bool(req.kv_transfer_params and req.kv_transfer_params.get("do_remote_prefill"))


def is_producer(req: Request) -> bool:
    return bool(req.kv_transfer_params and req.kv_transfer_params.get("do_remote_decode"))
