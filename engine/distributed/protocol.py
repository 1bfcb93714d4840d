"""Messages between the EP coordinator and its rank processes: msgpack, never pickle.

Every message is a map with a "type". Coordinator -> rank: init, regroup, step, reset,
shutdown. Rank -> coordinator: hello, ready, done (the answer to regroup, step and
reset), error. Tensors travel as nested lists (expert maps are small).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import msgpack

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError("malformed EP message: expected a map with a 'type'")
    return msg


def params_to_wire(sp: SamplingParams) -> dict[str, Any]:
    return asdict(sp)


def params_from_wire(d: dict[str, Any]) -> SamplingParams:
    known = {f.name for f in fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in d.items() if k in known})


def config_to_wire(c: EngineConfig) -> dict[str, Any]:
    return asdict(c)


def config_from_wire(d: dict[str, Any]) -> EngineConfig:
    return EngineConfig(**d)
