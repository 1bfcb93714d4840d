"""Prefill on one engine, decode on another.

The decode side drives it: `PrefillDecodeEngine.generate` asks a prefill engine (through
any async callable: a Ray handle under `cluster/`, a local engine in tests) to compute
the prompt and sample the first token, keeping its KV under a lease; then it admits the
request on the local decode engine with the returned KV handle, which pulls the blocks
and continues from the first token. The prefill engine runs `prefill_request`.

Both engines must draw the same sampling noise, so the decode side fixes the seed before
asking: the answer is then the same as if one engine had done everything.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from disagg.connector import PDObserver
from disagg.prefill_messages import PrefillRequest, PrefillResult
from engine.async_engine import AsyncEngine, StreamDelta
from engine.kv_transfer import KVTransferFailed
from engine.kv_transfer_params import KVTransferParams
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

# PrefillRequest.to_dict() -> PrefillResult.to_dict(): plain data, whatever the transport.
PrefillFn = Callable[[dict], Awaitable[dict]]
log = logging.getLogger(__name__)


async def prefill_request(engine: AsyncEngine, request: dict) -> dict:
    """Run one prefill (a PrefillRequest's dict) on this engine; returns the finished
    output as a PrefillResult's dict, with the KV handle when one is held."""
    req = PrefillRequest.from_dict(request)
    kv = KVTransferParams(do_remote_decode=True) if req.remote_decode else None
    final = None
    async for delta in engine.generate(req.prompt_token_ids, req.sampling, req.request_id, kv):
        final = delta
    out = final.output
    return PrefillResult(out.token_ids, out.text, out.finish_reason, out.logprobs, final.num_cached_tokens,
                         out.kv_transfer_params, out.prompt_logprobs).to_dict()


class PrefillDecodeEngine:
    """An AsyncEngine look-alike for the API layer: local decode, remote prefill."""

    def __init__(self, decode: AsyncEngine, prefill: PrefillFn, observer: PDObserver | None = None,
                 prefill_timeout_s: float = 10.0) -> None:
        self.decode = decode
        self._prefill_fn = prefill
        self.prefill_timeout_s = prefill_timeout_s
        self.observer = observer
        self.num_local_prefills = 0     # the prefill pool failed us; computed here instead
        self.tokenizer = decode.tokenizer
        self.max_model_len = decode.max_model_len
        self.config = decode.config
        self._rng = random.Random()

    @property
    def error(self) -> BaseException | None:
        return self.decode.error

    @property
    def limits(self):
        return self.decode.limits

    def check_health(self) -> None:
        self.decode.check_health()

    @property
    def max_in_flight(self) -> int:
        return self.decode.max_in_flight

    def stats(self) -> dict[str, float]:
        return self.decode.stats()

    @property
    def num_running(self) -> int:
        return self.decode.num_running

    @property
    def num_waiting(self) -> int:
        return self.decode.num_waiting

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """The prefill pool's answer, within the deadline: a dead or stalled prefill
        replica costs at most `prefill_timeout_s` before the decode engine takes over."""
        return PrefillResult.from_dict(await asyncio.wait_for(self._prefill_fn(request.to_dict()),
                                                              self.prefill_timeout_s))

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.decode.encode(prompt)

    def abort(self, request_id: str) -> None:
        self.decode.abort(request_id)

    def shutdown(self) -> None:
        self.decode.shutdown()

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       output_prefix: list[int] | None = None) -> AsyncIterator[StreamDelta]:
        ids = self.encode(prompt)
        self.decode.check_request(ids, params)   # refuse bad input before using a prefill engine
        if params.seed is None:
            params = replace(params, seed=self._rng.getrandbits(63))
        if output_prefix:       # a stream resumed here after its engine was lost: recompute it here
            async for delta in self.decode.generate(prompt, params, request_id, output_prefix=output_prefix):
                yield delta
            return
        text_prompt = prompt if isinstance(prompt, str) else None
        try:
            if params.max_tokens == 1:          # nothing to decode: the prefill is the answer
                result = await self.prefill(PrefillRequest(request_id, ids, params))
                yield _delta_from(request_id, text_prompt, ids, result)
                return
            # Stop strings are applied here, on the whole text; the prefill side only
            # needs to know about stop tokens.
            first = await self.prefill(PrefillRequest(request_id, ids, replace(params, max_tokens=1, stop=[]),
                                                      remote_decode=True))
        except ValueError:
            raise
        except Exception as e:      # the prefill pool is down, slow, overloaded or broken
            if self.decode.config.kv_load_failure_policy != "recompute":
                if self.observer is not None:
                    self.observer.failed("prefill")
                raise KVTransferFailed(f"the prefill engine failed: {e!r}") from e
            log.warning("prefill of %s failed (%r); computing it on the decode engine", request_id, e)
            self.num_local_prefills += 1
            produced = False
            try:
                async for delta in self.decode.generate(prompt, params, request_id):
                    if not produced and self.observer is not None:
                        self.observer.prefill_failed(recomputed=True)
                    produced = True
                    yield delta
            except Exception:
                if not produced and self.observer is not None:
                    self.observer.prefill_failed(recomputed=False)
                raise
            return
        kv = first.kv_transfer_params
        if first.finish_reason != "length" or kv is None or kv.handle is None:   # EOS or a stop token: done
            yield _delta_from(request_id, text_prompt, ids, first)
            return
        kv = replace(kv, first_token_ids=list(first.token_ids), first_logprobs=list(first.logprobs or []))
        prompt_logprobs = first.prompt_logprobs     # computed by the prefill engine
        async for delta in self.decode.generate(prompt, params, request_id, kv):
            if prompt_logprobs is not None:
                delta, prompt_logprobs = replace(delta, prompt_logprobs=prompt_logprobs), None
            yield delta


def _delta_from(request_id: str, prompt: str | None, ids: list[int], result: PrefillResult) -> StreamDelta:
    comp = CompletionOutput(0, result.text, list(result.token_ids), result.finish_reason, result.logprobs)
    out = RequestOutput(request_id, prompt, ids, [comp], True)
    return StreamDelta(out, result.text, list(result.token_ids), list(result.logprobs or []),
                       result.num_cached_tokens, result.prompt_logprobs)
