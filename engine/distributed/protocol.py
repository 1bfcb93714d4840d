"""Messages between the EP coordinator and its rank processes: small dataclasses with one
msgpack encoding each (never pickle).

Coordinator -> rank: Init, Regroup, Step, Reset, SetKVConnector, Shutdown. Rank -> coordinator: Hello,
Ready (after Init), RegroupDone, StepAnswer, ResetAnswer, Done (after SetKVConnector
and Shutdown), Error.
On the wire a message is a map {"type": its TYPE, "seq": n, **its fields}; each answer
echoes the seq of the message it answers. Tensors travel as nested lists (expert maps
are small). Plugins (EPLB) ride in the `ext` maps of Regroup, Step and StepAnswer under
their own name, encoded by their own message types (eplb/messages.py).

To add a field (e.g. KV-transfer settings on AddRequest): give it a default; fields
that are plain msgpack values need nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from engine.config import EngineConfig
from engine.kv_transfer_params import KVTransferParams
from engine.sampling_params import SamplingParams

_TYPES: dict[str, type[Message]] = {}


@dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _TYPES[cls.TYPE] = cls

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def pack(msg: Message, seq: int | None = None) -> bytes:
    return msgpack.packb({**msg.to_wire(), "type": msg.TYPE, "seq": seq}, use_bin_type=True)


def unpack(data: bytes) -> tuple[Message, int | None]:
    """(the message, the seq it carries)."""
    d = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(d, dict) or d.get("type") not in _TYPES:
        raise ValueError(f"malformed EP message: expected a map with a known 'type', got {str(d)[:80]}")
    return _TYPES[d.pop("type")].from_wire(d), d.get("seq")


def params_to_wire(sp: SamplingParams) -> dict[str, Any]:
    return asdict(sp)


def params_from_wire(d: dict[str, Any]) -> SamplingParams:
    known = {f.name for f in fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in d.items() if k in known})


# -- start-up --------------------------------------------------------------------------
@dataclass
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    pid: int = 0


@dataclass
class Init(Message):
    TYPE: ClassVar[str] = "init"
    config: dict[str, Any]          # EngineConfig fields
    model_path: str
    eos_token_ids: list[int]
    store_host: str
    store_port: int
    timeout_s: float = 60.0
    extensions: list[str] = field(default_factory=list)
    slot_experts: list[int] | None = None    # load only these experts' slots (one per slot)
    kv_connector: dict[str, Any] | None = None   # a KVConnectorSpec's wire form: the rank builds its own

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.config)

    @staticmethod
    def config_to_wire(c: EngineConfig) -> dict[str, Any]:
        return asdict(c)


@dataclass
class Ready(Message):
    """A rank built and loaded its model: what its MoE layers look like."""
    TYPE: ClassVar[str] = "ready"
    moe_layers: int = 0
    num_experts: int = 0
    slots_loaded: int = 0
    dispatch_width: int = 0       # values per token row a dispatch carries
    bytes_per_expert: int = 0


# -- generations -----------------------------------------------------------------------
@dataclass
class Regroup(Message):
    """Join generation `generation` as `rank` of `world_size` with the expert map
    phy2log [moe layers, world_size * slots_per_rank]."""
    TYPE: ClassVar[str] = "regroup"
    generation: int
    rank: int
    world_size: int
    slots_per_rank: int
    phy2log: list[list[int]]
    weights: str = "keep"          # 'model' (own loaded slots), 'none' (filled by migration), 'keep'
    dispatch: str = "normal"
    cuda_graphs: bool = False
    ext: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegroupDone(Message):
    TYPE: ClassVar[str] = "regrouped"
    graph_sizes: list[int] = field(default_factory=list)


@dataclass
class Reset(Message):
    """Drop every request (the survivors of a lost rank restart them)."""
    TYPE: ClassVar[str] = "reset"


@dataclass
class ResetAnswer(Message):
    TYPE: ClassVar[str] = "reset_done"
    aborted: int = 0
    local_phy2log: list[list[int]] = field(default_factory=list)   # per MoE layer, this rank's slots


@dataclass
class SetKVConnector(Message):
    """Build this rank's KV connector from a KVConnectorSpec's wire form (answer: Done)."""
    TYPE: ClassVar[str] = "kv_connector"
    kv_connector: dict[str, Any]


@dataclass
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"


@dataclass
class Done(Message):
    TYPE: ClassVar[str] = "done"


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    error: str = ""
    traceback: str = ""


# -- steps ---------------------------------------------------------------------------
@dataclass
class AddRequest(Message):
    """A request a rank admits (a prompt: tokens generated elsewhere come as prompt)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: KVTransferParams | None = None    # a KV hand-off, done on this rank

    def to_wire(self) -> dict[str, Any]:
        kv = self.kv_transfer_params
        return {**super().to_wire(), "params": params_to_wire(self.params),
                "kv_transfer_params": kv.to_dict() if kv is not None else None}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> AddRequest:
        kv = d.get("kv_transfer_params")
        return super().from_wire({**d, "params": params_from_wire(d["params"]),
                                  "kv_transfer_params": KVTransferParams.from_dict(kv) if kv else None})


@dataclass
class Step(Message):
    TYPE: ClassVar[str] = "step"
    step: int
    add: list[AddRequest] = field(default_factory=list)
    abort: list[str] = field(default_factory=list)
    ext: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "add": [a.to_wire() for a in self.add]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Step:
        return super().from_wire({**d, "add": [AddRequest.from_wire(a) for a in d.get("add", [])]})


@dataclass
class RankOutput(Message):
    """What one request produced in a step on a rank (EngineCoreOutput's fields)."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    kv_transfer_params: dict[str, Any] | None = None   # producer: the handle of the held KV
    error: str | None = None                           # e.g. a failed KV load under the fail policy


@dataclass
class StepAnswer(Message):
    TYPE: ClassVar[str] = "stepped"
    outputs: list[RankOutput] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)    # (request id, why)
    unfinished: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    ran_forward: bool = False
    kv_calls: list[list] = field(default_factory=list)   # the rank connector's observer calls (RecordedTransfers)
    kv_held: int = 0                                     # prefills whose blocks the rank holds for a reader
    ext: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "outputs": [o.to_wire() for o in self.outputs]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StepAnswer:
        return super().from_wire({**d, "outputs": [RankOutput.from_wire(o) for o in d.get("outputs", [])]})
