"""A request's part in a KV hand-off (vLLM's `kv_transfer_params`): one dataclass, one
plain-dict encoding (`to_dict` / `from_dict`, what goes into msgpack between processes
and over Ray), checked on the way in.

- producer (a prefill for another engine): `do_remote_decode`. Its output carries the
  params a consumer needs: `do_remote_prefill` and the connector's `handle`.
- consumer: `do_remote_prefill`, the producer's `handle` (opaque here: the connector
  reads it), and its `first_token_ids` / `first_logprobs`. The engine stamps `received`
  on arrival; a failed load leaves `do_remote_prefill` off and the `error`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class KVTransferParams:
    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    handle: dict[str, Any] | None = None
    first_token_ids: list[int] = field(default_factory=list)
    first_logprobs: list[dict[int, float]] = field(default_factory=list)
    received: float | None = None       # time.monotonic() when the consumer engine took it
    error: str | None = None            # why the load failed (then recomputed)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (plain data: msgpack, JSON, Ray)."""
        default = KVTransferParams()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_dict(cls, d: object) -> KVTransferParams:
        """Raises ValueError naming the first unknown or malformed field."""
        if isinstance(d, KVTransferParams):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"kv_transfer_params must be a map, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown kv_transfer_params fields: {', '.join(sorted(map(str, unknown)))} "
                             f"(known: {', '.join(sorted(known))})")
        checks = {"do_remote_decode": bool, "do_remote_prefill": bool, "handle": (dict, type(None)),
                  "first_token_ids": list, "first_logprobs": list, "received": (int, float, type(None)),
                  "error": (str, type(None))}
        for name, typ in checks.items():
            if name in d and not isinstance(d[name], typ):
                raise ValueError(f"kv_transfer_params field {name!r} has the wrong type: {d[name]!r:.80}")
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()})
