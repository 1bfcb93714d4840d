"""Results handed back to users of the offline API and the async engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_transfer_params import KVTransferParams

# One dict per token: token id -> logprob (the token itself and the top-n).
Logprobs = list[dict[int, float] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    logprobs: Logprobs | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    kv_transfer_params: KVTransferParams | None = None   # a prefill for another engine: its KV handle
    # SamplingParams.prompt_logprobs: per prompt token (None for the first), once the first token is out.
    prompt_logprobs: Logprobs | None = None

    # Shortcuts to the single completion (n=1 is the only mode).
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> Logprobs | None:
        return self.outputs[0].logprobs
