"""OpenAI-compatible HTTP API over an engine client: completions, chat completions
(streaming and not), models, health and metrics. Errors use OpenAI's error shape.

The engine client is anything with `generate(token_ids, params, request_id)` streaming
`StreamDelta`s, a `tokenizer`, request `limits` and `check_health()`: an AsyncEngine,
a PrefillDecodeEngine, or the router's RemoteEngine over a pool of Serve replicas.
Text is made here, from token ids (so a stream resumed on another replica reads on
seamlessly); tokenizing and chat templating run off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster.api_errors import (ERROR_RESPONSES, APIError, EdgeChecks, error_body, error_response,
                                install_error_handlers, overloaded)
from cluster.api_models import (ChatCompletion, ChatMessage, ChatRequest, Completion, CompletionRequest, Health,
                                ModelList, SamplingRequest)
from cluster.dashboard import dashboard_router
from cluster.metrics import Metrics
from cluster.request_metrics import SLO, RequestTimer
from engine.async_engine import EngineDead, EngineOverloaded, RequestFailed, StreamDelta
from engine.kv_transfer import KVTransferFailed
from engine.sampling_params import MAX_SEED, SamplingParams
from engine.tokenizer import IncrementalDetokenizer

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
# Used when a tokenizer has no chat template: role-tagged turns, then the assistant tag.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Each event's data is one JSON chunk, an error object, or the final "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "description": "a JSON chunk, an error, or [DONE]"}}}
SSE = {200: {"description": "The answer (JSON), or with stream=true an event stream of chunks",
             "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends, however it ends: on a client hang-up
    Starlette cancels the sending task and leaves the generator suspended until the
    garbage collector finds it, which would leave the request running in the engine."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _Output:
    """One request's output as the client sees it: tokens, logprobs and text, folded
    from the engine's token deltas; a stop string ends it here."""

    def __init__(self, tokenizer, stop: list[str], generate: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, stop)
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self.generate = generate    # False: max_tokens=0, the engine's one token is not shown

    def add(self, d: StreamDelta) -> str:
        if self.prompt_logprobs is None:    # the first attempt's (a resumed stream sends longer ones)
            self.prompt_logprobs = d.prompt_logprobs
        if not self.generate:
            self.finish_reason = d.output.finish_reason and "length"
            return ""
        self.token_ids += d.new_token_ids
        self.logprobs += d.new_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        reason = d.output.finish_reason
        text = self.detok.add(d.new_token_ids, final=reason is not None)
        self.finish_reason = "stop" if self.detok.stopped else reason
        return text

    @property
    def text(self) -> str:
        return self.detok.text


class _Admission:
    """One admitted request's place in the in-flight count. `with` it while preparing
    (an error there gives the place back); `hold()` hands it to the stream, whose own
    `with` gives it back when the stream ends."""

    def __init__(self, counter: list[int]) -> None:
        self.counter, self.held, self.released = counter, False, False
        counter[0] += 1

    def hold(self) -> None:
        self.held = True

    def __enter__(self) -> _Admission:
        return self

    def __exit__(self, *exc) -> None:
        if self.held and exc[0] is None:
            self.held = False      # the stream's `with` releases it
            return
        if not self.released:
            self.released = True
            self.counter[0] -= 1


def build_api(engine, model_name: str, metrics: Metrics, slo: SLO = SLO(), api_key: str | None = None,
              refresh_gauges: Callable[[], None] | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="Tandem", description="OpenAI-compatible API")
    app.state.engine = engine
    refresh = refresh_gauges or (lambda: metrics.record_stats(engine.stats()))
    app.include_router(dashboard_router(refresh, metrics))   # /dashboard: built-in plots
    install_error_handlers(app)
    in_flight = [0]     # requests admitted here and not yet finished

    def at_limit() -> bool:
        if in_flight[0] < engine.max_in_flight:
            return False
        metrics.inc("tandem_requests_rejected_total", reason="overloaded")
        return True
    app.add_middleware(EdgeChecks, max_bytes=max_body_bytes, api_key=api_key, overloaded=at_limit,
                       generation_paths=("/v1/completions", "/v1/chat/completions"))
    limits = engine.limits
    app.openapi = lambda: openapi_with_limits(app, model_name, limits)

    @app.get("/health", response_model=Health, responses={503: ERROR_RESPONSES[503]})
    async def health():
        try:
            engine.check_health()
        except EngineDead as e:
            return error_response(503, str(e), "server_error")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics():
        refresh()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tandem", "max_model_len": limits.max_model_len}]}

    def sampling(body: SamplingRequest, logprobs: int | None, max_tokens: int | None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                           "not_found_error", param="model")
        for name in ("max_tokens", "max_completion_tokens"):       # as the schema states
            value = getattr(body, name, None)
            if value is not None and value >= limits.max_model_len:
                raise APIError(400, f"{name} must be below max_model_len ({limits.max_model_len})", param=name)
        if body.top_k > limits.vocab_size:
            raise APIError(400, f"top_k must be -1 or at most the vocabulary size ({limits.vocab_size})",
                           param="top_k")
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        if bias and max(bias) >= limits.vocab_size:
            raise APIError(400, f"logit_bias token ids must be below the vocabulary size ({limits.vocab_size})",
                           param="logit_bias")
        try:
            # max_tokens=0 (echo only) still runs the prompt; its one token is dropped by _Output.
            return SamplingParams(max_tokens=16 if max_tokens is None else max(max_tokens, 1),
                                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, seed=None if body.seed is None else body.seed & MAX_SEED,
                                  stop=body.stop or [], ignore_eos=body.ignore_eos, logprobs=logprobs,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  repetition_penalty=body.repetition_penalty, logit_bias=bias or None,
                                  prompt_logprobs=prompt_logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def admit() -> _Admission:
        """Take a place in the in-flight count, or refuse before any tokenizing (the edge
        refused most overload before the body was read; this settles the races)."""
        if at_limit():
            raise overloaded(f"{in_flight[0]} requests are in flight, the limit; retry later")
        return _Admission(in_flight)

    async def tokens_of(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
        return await asyncio.to_thread(engine.tokenizer.encode, prompt)

    async def run(ids: list[int], params: SamplingParams, rid: str, out: _Output,
                  admission: _Admission) -> AsyncIterator[str]:
        """The request's text deltas; the engine's errors as APIErrors."""
        with admission:
            if len(ids) < limits.max_model_len:     # generation stops at the context's end ("length")
                params = replace(params, max_tokens=min(params.max_tokens, limits.max_model_len - len(ids)))
            try:
                limits.check(ids, params)
            except ValueError as e:
                raise APIError(400, str(e)) from None
            timer = RequestTimer(metrics, slo)
            stream = engine.generate(ids, params, rid)
            try:
                async for delta in stream:
                    timer.on_tokens(len(delta.new_token_ids))
                    text = out.add(delta)
                    yield text
                    if out.finish_reason is not None:
                        return
            except ValueError as e:
                raise APIError(400, str(e)) from None
            except EngineOverloaded as e:
                metrics.inc("tandem_requests_rejected_total", reason="overloaded")
                raise overloaded(str(e)) from None
            except (EngineDead, KVTransferFailed) as e:   # the client may retry
                metrics.inc("tandem_request_errors_total", kind="unavailable")
                raise APIError(503, str(e), "server_error") from None
            except RequestFailed as e:
                metrics.inc("tandem_request_errors_total", kind="failed")
                raise APIError(500, f"the request failed in the engine: {e}", "server_error") from None
            finally:
                await stream.aclose()        # a stop string or a disconnect: the engine aborts it
                if out.token_ids or out.finish_reason:
                    timer.on_finish(out.finish_reason or "abort", len(ids), out.num_cached_tokens)

    def usage(prompt_tokens: int, out: _Output) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

    def tok(t: int) -> str:
        return engine.tokenizer.decode([t]) if engine.tokenizer is not None else str(t)

    async def respond(texts: AsyncIterator[str], stream: bool, chunks: Callable, final: Callable):
        """A StreamingResponse of SSE chunks, or the final JSON. The first update is
        awaited before answering, so refusals are proper HTTP errors; an error after
        the stream started is sent as an error event, never a silent cut."""
        first = await anext(texts, None)
        if not stream:
            async for _ in texts:
                pass
            return final()

        async def sse():
            try:
                for c in chunks(first, head=True):
                    yield _sse(c)
                async for text in texts:
                    for c in chunks(text):
                        yield _sse(c)
                for c in chunks(None, tail=True):
                    yield _sse(c)
            except APIError as e:
                yield _sse(error_body(e.status, e.message, e.type, e.param))
            finally:
                await texts.aclose()    # the client went away mid-stream: abort in the engine
            yield "data: [DONE]\n\n"
        return _ClosingStreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **SSE})
    async def completions(body: CompletionRequest):
        echo_lp = body.logprobs if body.echo else None
        params = sampling(body, body.logprobs, body.max_tokens, prompt_logprobs=echo_lp)
        with admit() as admission:
            ids = await tokens_of(body.prompt)
            admission.hold()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        out = _Output(engine.tokenizer, params.stop, generate=body.max_tokens != 0)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        sent = 0
        echoed = False      # the prompt (and its logprobs) go out once, before the completion

        def lp(start: int, end: int, head: bool = False):
            if body.logprobs is None:
                return None
            ts, lps = out.token_ids[start:end], out.logprobs[start:end]
            res = {"tokens": [tok(t) for t in ts], "token_logprobs": [p[t] for t, p in zip(ts, lps)],
                   "top_logprobs": [{tok(k): v for k, v in p.items()} for p in lps], "text_offset": []}
            if head and body.echo:
                plp = out.prompt_logprobs
                if plp is None or len(plp) != len(ids):
                    raise APIError(500, "the engine did not return the prompt's logprobs", "server_error")
                res = {"tokens": [tok(t) for t in ids] + res["tokens"],
                       "token_logprobs": [None if p is None else p[t] for t, p in zip(ids, plp)] + res["token_logprobs"],
                       "top_logprobs": [None if p is None else {tok(k): v for k, v in p.items()} for p in plp]
                       + res["top_logprobs"], "text_offset": []}
            return res

        async def prompt_text() -> str:
            if isinstance(body.prompt, str):
                return body.prompt
            if engine.tokenizer is None:
                return ""
            return await asyncio.to_thread(engine.tokenizer.decode, ids)
        echo_text = await prompt_text() if body.echo else ""

        def chunk(choices: list, use: dict | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": use}

        def chunks(text: str | None, head: bool = False, tail: bool = False):
            nonlocal sent
            if tail:
                return [chunk([], usage(len(ids), out))] if include_usage else []
            if text is None:
                return []
            nonlocal echoed
            first, echoed = not echoed, True
            start, sent = sent, len(out.token_ids)
            return [chunk([{"index": 0, "text": (echo_text if first else "") + text,
                            "logprobs": lp(start, sent, head=first), "finish_reason": out.finish_reason}])]

        def final():
            return chunk([{"index": 0, "text": echo_text + out.text, "logprobs": lp(0, len(out.token_ids), head=True),
                           "finish_reason": out.finish_reason}], usage(len(ids), out))
        return await respond(run(ids, params, rid, out, admission), body.stream, chunks, final)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_RESPONSES, **SSE})
    async def chat(body: ChatRequest):
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, n_lp, max_tokens)
        with admit() as admission:
            ids = await asyncio.to_thread(_chat_prompt, engine.tokenizer, body.messages)
            admission.hold()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        out = _Output(engine.tokenizer, params.stop)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        sent = 0

        def chat_logprobs(start: int, end: int):
            if n_lp is None:
                return None
            content = []
            for t, lp in zip(out.token_ids[start:end], out.logprobs[start:end]):
                top = sorted(lp.items(), key=lambda kv: -kv[1])[:n_lp]
                content.append({"token": tok(t), "logprob": lp[t], "bytes": list(tok(t).encode()),
                                "top_logprobs": [{"token": tok(k), "logprob": v, "bytes": list(tok(k).encode())}
                                                 for k, v in top]})
            return {"content": content}

        def chunk(choices: list, use: dict | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices, "usage": use}

        def chunks(text: str | None, head: bool = False, tail: bool = False):
            nonlocal sent
            if tail:
                return [chunk([], usage(len(ids), out))] if include_usage else []
            lead = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
            if text is None:
                return lead if head else []
            start, sent = sent, len(out.token_ids)
            body_chunk = chunk([{"index": 0, "delta": {"content": text}, "logprobs": chat_logprobs(start, sent),
                                 "finish_reason": out.finish_reason}])
            return (lead if head else []) + [body_chunk]

        def final():
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "logprobs": chat_logprobs(0, len(out.token_ids)),
                                 "finish_reason": out.finish_reason}],
                    "usage": usage(len(ids), out)}
        return await respond(run(ids, params, rid, out, admission), body.stream, chunks, final)

    return app


def _chat_prompt(tk, messages: list[ChatMessage]) -> list[int]:
    if tk is None:
        raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions")
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    template = tk.chat_template or FALLBACK_CHAT_TEMPLATE
    text = tk.apply_chat_template(convo, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tk.encode(text, add_special_tokens=False)   # the template already placed any BOS


def openapi_with_limits(app: FastAPI, model_name: str, limits) -> dict:
    """The OpenAPI schema with what FastAPI cannot know: the served model's name and
    limits, and 400 (not 422) as the status of invalid requests."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
    for path in schema["paths"].values():
        for op in path.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
    comps = schema["components"]["schemas"]
    for name in ("ValidationError", "HTTPValidationError"):
        comps.pop(name, None)
    for req in ("CompletionRequest", "ChatRequest"):
        props = comps[req]["properties"]
        props["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        props["top_k"]["maximum"] = min(props["top_k"]["maximum"], limits.vocab_size)
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                for option in props[field].get("anyOf", [props[field]]):
                    if option.get("type") == "integer":
                        option["maximum"] = min(option["maximum"], limits.max_model_len - 1)
        for option in props["logit_bias"]["anyOf"]:
            if option.get("type") == "object":     # keys: token ids of this vocabulary, nothing else
                option["patternProperties"] = {below_pattern(limits.vocab_size): option["patternProperties"].popitem()[1]}
                option["additionalProperties"] = False
    for option in comps["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        if option.get("type") == "array":
            option["items"]["maximum"] = min(option["items"]["maximum"], limits.vocab_size - 1)
            option["maxItems"] = limits.max_model_len - 1
    app.openapi_schema = schema
    return schema


def below_pattern(n: int) -> str:
    """A regex of the decimal integers 0 .. n - 1 (no leading zeros, n >= 1)."""
    m = str(n - 1)
    k = len(m)
    alts = ["0"] if k == 1 else ["0", "[1-9][0-9]{0,%d}" % (k - 2) if k > 2 else "[1-9]"]
    for i, d in enumerate(m):
        lo = 1 if i == 0 else 0
        if int(d) > lo:
            hi = int(d) - 1
            digit = str(lo) if hi == lo else f"[{lo}-{hi}]"
            alts.append(m[:i] + digit + ("[0-9]{%d}" % (k - i - 1) if k - i - 1 else ""))
    alts.append(m)
    return "^(" + "|".join(dict.fromkeys(alts)) + ")$"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
