"""The OpenAI API's request and response bodies, with the bounds the server enforces.

Every field states its valid range here, so one definition serves validation (a 400
naming the field and the range) and the served OpenAPI schema (what schema-driven
clients and fuzzers read). Bounds that depend on the model (vocabulary, context
length, served name) are filled into the schema by `openai_api.openapi_with_limits`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, field_validator

from engine.sampling_params import INT32_MAX, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_LOGPROBS = 20             # OpenAI's range for logprobs / top_logprobs


def _json_integer(value):
    """JSON's integers: 7 and 7.0 (JSON Schema counts both), never true/false or "7"."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json_number(value):
    """JSON's numbers, never true/false (Python counts bools as numbers)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_json_number)]


def bounded(lo: int, hi: int):
    """A JSON integer in [lo, hi] (as a type, so the bounds reach the schema inside unions)."""
    return Annotated[StrictInt, Field(ge=lo, le=hi), BeforeValidator(_json_integer)]


TokenId = bounded(0, INT32_MAX)
# Any integer seed, reduced to the engine's 63 bits (seed mod 2**63). No bound is
# stated: past 2**53 JSON tools compare numbers as doubles, so no 64-bit bound means
# the same to every client and validator.
Seed = Annotated[StrictInt, BeforeValidator(_json_integer)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


def _encodable(value):
    """Strings must be valid Unicode (JSON lets a lone surrogate such as "\\ud800" through)."""
    for s in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are ignored."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(description="The served model's name (see GET /v1/models)")
    max_tokens: bounded(1, INT32_MAX) | None = Field(None, description="Tokens to generate (default 16); generation also stops "
                                                           "where the context (max_model_len) ends")
    temperature: Number = Field(1.0, ge=0.0, description="0 is greedy; must be finite")
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: bounded(-1, INT32_MAX) = Field(-1, description="-1 or 0 disables; at most the vocabulary size")
    min_p: Number = Field(0.0, ge=0.0, le=1.0)
    seed: Seed | None = Field(None, description="Any integer; the engine uses it modulo 2**63")
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: bounded(1, 1) = Field(1, description="Only 1 is supported")
    ignore_eos: StrictBool = False
    user: str | None = Field(None, max_length=256)

    _text = field_validator("stop")(classmethod(lambda cls, v: _encodable(v)))


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="Text, or token ids")
    logprobs: bounded(0, MAX_LOGPROBS) | None = None

    _prompt = field_validator("prompt")(classmethod(lambda cls, v: _encodable(v)))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    _text = field_validator("text")(classmethod(lambda cls, v: _encodable(v)))


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    _content = field_validator("content")(classmethod(lambda cls, v: _encodable(v)))

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: bounded(1, INT32_MAX) | None = Field(None, description="Takes precedence over max_tokens")
    logprobs: StrictBool = False
    top_logprobs: bounded(0, MAX_LOGPROBS) | None = None


# -- responses (documented in the schema; the routes build plain dicts) ----------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
