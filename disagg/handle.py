"""The KV handle: what a producer engine returns with a finished prefill so a consumer
can read the KV. Plain data (it crosses processes as msgpack/JSON), checked on entry."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVHandle:
    engine_id: str          # the producer's NIXL agent name
    host: str               # its side channel
    port: int
    request_id: str         # the producer's request (its lease)
    block_ids: list[int]    # the prompt's blocks on the producer, in order
    num_tokens: int         # tokens of KV in those blocks
    layout_hash: str
    lease_s: float          # the producer frees the blocks this long after the handle
    state_slot: int | None = None   # hybrid models: the producer's Mamba state slot (same lease)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> KVHandle:
        """Raises ValueError naming the first field that is missing or malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"a KV handle is a dict, got {type(d).__name__}")
        types = {"engine_id": str, "host": str, "port": int, "request_id": str, "block_ids": list,
                 "num_tokens": int, "layout_hash": str, "lease_s": (int, float)}
        for name, typ in types.items():
            if not isinstance(d.get(name), typ) or isinstance(d.get(name), bool):
                kind = typ.__name__ if isinstance(typ, type) else "a number"
                raise ValueError(f"KV handle field {name!r} must be {kind}, got {d.get(name)!r:.80}")
        if not all(isinstance(b, int) and b >= 0 for b in d["block_ids"]):
            raise ValueError("KV handle block_ids must be non-negative ints")
        if d["num_tokens"] < 1 or not 0 < d["port"] < 65536 or d["lease_s"] <= 0:
            raise ValueError("KV handle num_tokens must be >= 1, port in 1..65535 and lease_s > 0")
        slot = d.get("state_slot")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or slot < 0):
            raise ValueError(f"KV handle field 'state_slot' must be a non-negative int or null, got {slot!r:.80}")
        return cls(**{k: d[k] for k in types}, state_slot=slot)
