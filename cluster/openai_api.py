"""OpenAI-compatible HTTP API over an AsyncEngine: completions, chat completions
(streaming and not), models, health and metrics. Errors use OpenAI's error shape."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from cluster.dashboard import dashboard_router
from cluster.metrics import Metrics
from cluster.request_metrics import SLO, RequestTimer
from engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded, StreamDelta
from engine.kv_transfer import KVTransferFailed
from engine.sampling_params import SamplingParams

# Used when a tokenizer has no chat template: role-tagged turns, then the assistant tag.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


def build_api(engine: AsyncEngine, model_name: str, metrics: Metrics, slo: SLO = SLO(),
              api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="Tandem", description="OpenAI-compatible API")
    app.state.engine = engine
    app.include_router(dashboard_router(engine, metrics))   # /dashboard: built-in plots

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return _error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"invalid request: {first.get('msg', str(e))} ({loc})", param=loc)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                              "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return _error(503, f"engine stopped: {engine.error!r}", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.set("tandem_num_requests_running", engine.num_running)
        metrics.set("tandem_num_requests_waiting", engine.num_waiting)
        metrics.set("tandem_kv_cache_usage_perc", engine.core.kv.usage)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tandem", "max_model_len": engine.max_model_len}]}

    def sampling(body: _Sampling, logprobs: int | None, max_tokens: int | None) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                           param="model")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        try:
            return SamplingParams(max_tokens=16 if max_tokens is None else max_tokens,
                                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, seed=body.seed, stop=body.stop or [],
                                  ignore_eos=body.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def run(prompt, params: SamplingParams, rid: str) -> AsyncIterator[StreamDelta]:
        timer = RequestTimer(metrics, slo)
        last = None
        try:
            async for delta in engine.generate(prompt, params, rid):
                timer.on_tokens(len(delta.new_token_ids))
                last = delta
                yield delta
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except EngineOverloaded as e:
            raise APIError(503, str(e), "server_error") from None
        except EngineDead as e:
            raise APIError(500, str(e), "server_error") from None
        except KVTransferFailed as e:     # disaggregated, fail policy: the client may retry
            raise APIError(503, str(e), "server_error") from None
        finally:
            if last is not None:
                reason = last.output.finish_reason or "abort"
                timer.on_finish(reason, len(last.output.prompt_token_ids), last.num_cached_tokens)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def tok(t: int) -> str:
        return engine.tokenizer.decode([t]) if engine.tokenizer is not None else str(t)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise APIError(400, "logprobs must be between 0 and 20", param="logprobs")
        params = sampling(body, body.logprobs, body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion_logprobs(d: StreamDelta):
            if body.logprobs is None:
                return None
            return {"tokens": [tok(t) for t in d.new_token_ids],
                    "token_logprobs": [lp[t] for t, lp in zip(d.new_token_ids, d.new_logprobs)],
                    "top_logprobs": [{tok(k): v for k, v in lp.items()} for lp in d.new_logprobs],
                    "text_offset": []}

        def chunk(choice: dict, use: dict | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [choice] if choice else [], "usage": use}

        stream = run(body.prompt, params, rid)
        first = await _first_or_error(stream)
        if body.stream:
            async def sse():
                last = None
                async for d in _prepend(first, stream):
                    last = d
                    yield _sse(chunk({"index": 0, "text": d.text_delta, "logprobs": completion_logprobs(d),
                                      "finish_reason": d.output.finish_reason}))
                if last is not None and (body.stream_options or {}).get("include_usage"):
                    yield _sse(chunk({}, usage(len(last.output.prompt_token_ids), len(last.output.token_ids))))
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        deltas = [d async for d in _prepend(first, stream)]
        out = deltas[-1].output
        lp = None
        if body.logprobs is not None:
            merged = StreamDelta(out, "", out.token_ids, out.logprobs or [])
            lp = completion_logprobs(merged)
        return chunk({"index": 0, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason},
                     usage(len(out.prompt_token_ids), len(out.token_ids)))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, n_lp, body.max_completion_tokens or body.max_tokens)
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        prompt = _chat_prompt(engine, body.messages)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chat_logprobs(ids: list[int], lps: list[dict]):
            if n_lp is None:
                return None
            content = []
            for t, lp in zip(ids, lps):
                top = sorted(lp.items(), key=lambda kv: -kv[1])[:n_lp]
                content.append({"token": tok(t), "logprob": lp[t], "bytes": list(tok(t).encode()),
                                "top_logprobs": [{"token": tok(k), "logprob": v, "bytes": list(tok(k).encode())}
                                                 for k, v in top]})
            return {"content": content}

        def chunk(choices: list, use: dict | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices, "usage": use}

        stream = run(prompt, params, rid)
        first = await _first_or_error(stream)
        if body.stream:
            async def sse():
                yield _sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}]))
                last = None
                async for d in _prepend(first, stream):
                    last = d
                    yield _sse(chunk([{"index": 0, "delta": {"content": d.text_delta},
                                       "logprobs": chat_logprobs(d.new_token_ids, d.new_logprobs),
                                       "finish_reason": d.output.finish_reason}]))
                if last is not None and (body.stream_options or {}).get("include_usage"):
                    yield _sse(chunk([], usage(len(last.output.prompt_token_ids), len(last.output.token_ids))))
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        deltas = [d async for d in _prepend(first, stream)]
        out = deltas[-1].output
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": chat_logprobs(out.token_ids, out.logprobs or []),
                             "finish_reason": out.finish_reason}],
                "usage": usage(len(out.prompt_token_ids), len(out.token_ids))}

    return app


def _chat_prompt(engine: AsyncEngine, messages: list[ChatMessage]) -> str | list[int]:
    tk = engine.tokenizer
    if tk is None:
        raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions")
    convo = [m.model_dump() for m in messages]
    template = tk.chat_template or FALLBACK_CHAT_TEMPLATE
    text = tk.apply_chat_template(convo, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tk.encode(text, add_special_tokens=False)   # the template already placed any BOS


async def _first_or_error(stream: AsyncIterator[StreamDelta]) -> StreamDelta | None:
    """Pull the first update before answering, so validation and overload errors become
    proper HTTP errors instead of a broken stream."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: StreamDelta | None, rest: AsyncIterator[StreamDelta]) -> AsyncIterator[StreamDelta]:
    if first is not None:
        yield first
        async for d in rest:
            yield d


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
