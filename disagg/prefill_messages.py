"""What the decode side sends a prefill engine and what comes back: two dataclasses, each
with one plain-dict encoding (`to_dict` / `from_dict`), which is what crosses processes
(msgpack over the ZeroMQ prefill service, a Serve handle's call under Ray)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from engine.kv_transfer_params import KVTransferParams
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    remote_decode: bool = False         # keep the KV for a reader (and return its handle)

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "prompt_token_ids": list(self.prompt_token_ids),
                "sampling": asdict(self.sampling), "remote_decode": self.remote_decode}

    @classmethod
    def from_dict(cls, d: object) -> PrefillRequest:
        """Raises ValueError for a map that is not a prefill request."""
        if not isinstance(d, dict) or not isinstance(d.get("sampling"), dict):
            raise ValueError("a prefill request is a map with request_id, prompt_token_ids and sampling")
        known = {f.name for f in fields(SamplingParams)}
        bad = set(d["sampling"]) - known
        if bad:
            raise ValueError(f"unknown sampling fields in the prefill request: {', '.join(sorted(map(str, bad)))}")
        return cls(str(d["request_id"]), list(d["prompt_token_ids"]), SamplingParams(**d["sampling"]),
                   bool(d.get("remote_decode", False)))


@dataclass(frozen=True)
class PrefillResult:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: KVTransferParams | None = None   # when the KV is held for a reader
    prompt_logprobs: list | None = None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.kv_transfer_params is not None:
            d["kv_transfer_params"] = self.kv_transfer_params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrefillResult:
        kv = d.get("kv_transfer_params")
        return cls(list(d["token_ids"]), d["text"], d["finish_reason"], d.get("logprobs"),
                   d.get("num_cached_tokens", 0), KVTransferParams.from_dict(kv) if kv else None,
                   d.get("prompt_logprobs"))
