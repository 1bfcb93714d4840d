"""The OpenAI API's request and response bodies, with the bounds the server enforces.

Every field states its valid range here, so one definition serves validation (a 400
naming the field and the range) and the served OpenAPI schema (what schema-driven
clients and fuzzers read). Bounds that depend on the model (vocabulary, context
length, served name) are filled into the schema by `openai_api.openapi_with_limits`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, field_validator

from engine.sampling_params import (INT32_MAX, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_PENALTY,
                                    MAX_REPETITION_PENALTY, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS)

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
# JSON object keys are strings: a token id in decimal, no leading zeros (the served
# schema narrows the pattern to the vocabulary, see openapi_with_limits).
TOKEN_ID_KEY = r"^(0|[1-9][0-9]{0,9})$"
LogitBias = Annotated[dict[Annotated[str, Field(pattern=TOKEN_ID_KEY)],
                           # (Field before the validator, or the bounds miss the schema)
                           Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS),
                                     BeforeValidator(_json_number)]],
                      Field(max_length=MAX_LOGIT_BIAS_ENTRIES)]


def unsupported(name: str, why: str = ""):
    """A parameter clients send that this server does not implement: absent or null is
    fine; anything else is a 400 naming it (never silently ignored)."""
    def refuse(value):
        if value is not None:
            raise ValueError(f"{name} is not supported by this server{why}; leave it out")
        return value
    return Annotated[None, BeforeValidator(refuse), Field(None, description=f"Not supported{why}: null or absent")]


def _encodable(value):
    """Strings must be valid Unicode (JSON lets a lone surrogate such as "\\ud800" through)."""
    for s in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


def _plain_text_only(value):
    if value is not None and value != {"type": "text"}:
        raise ValueError("response_format is not supported by this server beyond {\"type\": \"text\"} "
                         "(no structured output); leave it out")
    return value


def _no_tool_choice(value):
    if value is not None and value != "none":
        raise ValueError("tool_choice is not supported by this server (no tool calling); leave it out")
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
    presence_penalty: Number = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                     description="Subtracted from the logit of each token generated so far")
    frequency_penalty: Number = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                      description="Times its count, subtracted from each generated token's logit")
    repetition_penalty: Number = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY,
                                       description="Prompt and generated tokens: a positive logit is divided by "
                                                   "it, a negative one multiplied (1 is off)")
    logit_bias: LogitBias | None = Field(None, description="Token id (a decimal string) -> bias added to its "
                                                           "logit, in [-100, 100]")
    # Sent by clients, not implemented: refused by name (see unsupported()).
    response_format: Annotated[TextFormat | None, BeforeValidator(_plain_text_only)] = Field(
        None, description="Only {\"type\": \"text\"} (the default): no structured output")
    tools: unsupported("tools", " (no tool calling)") = None
    tool_choice: Annotated[Literal["none"] | None, BeforeValidator(_no_tool_choice)] = Field(
        None, description="Only \"none\": no tool calling")
    functions: unsupported("functions", " (no tool calling)") = None
    function_call: unsupported("function_call", " (no tool calling)") = None
    guided_json: unsupported("guided_json", " (no structured output)") = None
    guided_regex: unsupported("guided_regex", " (no structured output)") = None
    guided_choice: unsupported("guided_choice", " (no structured output)") = None
    guided_grammar: unsupported("guided_grammar", " (no structured output)") = None
    structured_outputs: unsupported("structured_outputs", " (no structured output)") = None
    min_tokens: unsupported("min_tokens") = None

    _text = field_validator("stop")(classmethod(lambda cls, v: _encodable(v)))


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="Text, or token ids")
    max_tokens: bounded(0, INT32_MAX) | None = Field(None, description="Tokens to generate (default 16; 0 "
                                                     "generates none, for echo); generation also stops where "
                                                     "the context (max_model_len) ends")
    logprobs: bounded(0, MAX_LOGPROBS) | None = Field(None, description="Top-n logprobs per token (with echo, "
                                                                        "of the prompt's tokens too)")
    echo: StrictBool = Field(False, description="The prompt before the completion (with logprobs: its "
                                                "tokens' logprobs, the first null)")
    best_of: bounded(1, 1) | None = Field(None, description="Only 1 is supported")
    suffix: unsupported("suffix", " (no insertion)") = None

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
    token_logprobs: list[float | None]          # with echo, null for the prompt's first token
    top_logprobs: list[dict[str, float] | None]
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
