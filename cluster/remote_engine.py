"""The router's engine client: requests go to a pool of engine replicas through a Ray
Serve handle, and a stream whose replica dies goes on from another one.

Engine replicas stream plain dicts (`token_delta` / `error_item`); an error is data,
never a pickled exception, so both sides agree on what it means. When a replica is
lost mid-stream, the request is resubmitted to another replica with the tokens already
streamed as its output so far (recomputed there, counted by max_tokens and the
penalties as before): sampling noise is a function of (seed, position, token), and the
router fixes a seed for every request, so the continuation is exactly what the lost
replica would have produced.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import asdict, replace

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from cluster.metrics import Metrics
from engine.async_engine import EngineDead, EngineDown, EngineOverloaded, RequestFailed, StreamDelta
from engine.kv_transfer import KVTransferFailed
from engine.outputs import CompletionOutput, RequestOutput
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
# Subclasses before their bases: the first match names the kind.
_ERRORS = {"invalid": ValueError, "overloaded": EngineOverloaded, "down": EngineDown, "dead": EngineDead,
           "unavailable": KVTransferFailed, "failed": RequestFailed}


def token_delta(d: StreamDelta) -> dict:
    return {"token_ids": d.new_token_ids, "logprobs": d.new_logprobs, "finish_reason": d.output.finish_reason,
            "num_cached_tokens": d.num_cached_tokens, "prompt_logprobs": d.prompt_logprobs}


def error_item(e: Exception) -> dict | None:
    """An engine error as stream data, or None for an error that is not the engine's."""
    for kind, cls in _ERRORS.items():
        if isinstance(e, cls):
            return {"error": {"kind": kind, "message": str(e)}}
    return None


def raise_error(item: dict) -> None:
    err = item["error"]
    raise _ERRORS.get(err["kind"], RequestFailed)(err["message"])


class RemoteEngine:
    """An engine client over a Serve deployment of engine replicas (see cluster/pools.py)."""

    def __init__(self, pool, tokenizer, limits: RequestLimits, metrics: Metrics, max_in_flight: int,
                 max_resumes: int = 2, resume_wait_s: float = 60.0) -> None:
        self.pool = pool.options(stream=True)
        self.tokenizer, self.limits, self.metrics = tokenizer, limits, metrics
        self.max_in_flight, self.max_resumes = max_in_flight, max_resumes
        self.resume_wait_s = resume_wait_s
        self._rng = random.Random()

    def check_health(self) -> None:
        """The router holds no engine; each replica's own health check covers it."""

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[StreamDelta]:
        if params.seed is None:     # fixed here, so a resumed stream draws the same noise
            params = replace(params, seed=self._rng.getrandbits(63))
        produced: list[int] = []
        resumes = attempts = 0
        waited = 0.0
        while len(produced) < params.max_tokens:
            attempts += 1
            request = {"request_id": f"{request_id}-{attempts}" if attempts > 1 else request_id,
                       "prompt_token_ids": prompt_token_ids, "output_token_ids": list(produced),
                       "sampling": asdict(params)}
            stream = self.pool.generate.remote(request)
            settled = False     # finished, or failed in a way that needs no cancelling
            try:
                async for item in stream:
                    if "error" in item:
                        settled = True
                        raise_error(item)
                    # A resumed stream's prompt logprobs were delivered before it was lost.
                    prompt_logprobs = None if produced else item.get("prompt_logprobs")
                    produced += item["token_ids"]
                    out = RequestOutput(request_id, None, prompt_token_ids,
                                        [CompletionOutput(0, "", list(produced), item["finish_reason"])],
                                        item["finish_reason"] is not None)
                    yield StreamDelta(out, "", item["token_ids"], item["logprobs"], item["num_cached_tokens"],
                                      prompt_logprobs)
                    if item["finish_reason"] is not None:
                        settled = True
                        return
                settled = True
                raise EngineDead("the engine replica ended the stream without finishing it")
            except EngineDown as e:
                # The replica's engine was already dead: the request never ran there.
                # Serve keeps routing to it (it answers fastest) until its health check
                # fails, so wait a little and send it again, for as long as a resume may.
                settled = True
                if waited >= self.resume_wait_s:
                    raise EngineDead(f"no live engine replica for {waited:.0f} s: {e}") from None
                pause = min(1.0, 0.05 * 2 ** min(attempts, 5))
                await asyncio.sleep(pause)
                waited += pause
            except (BackPressureError, EngineOverloaded) as e:
                settled = True
                if resumes and waited < self.resume_wait_s:
                    # An admitted stream being resumed is owed its tokens: the surviving
                    # replicas are full for now (they took the lost one's load), so wait.
                    pause = min(1.0, 0.05 * 2 ** min(attempts, 5))
                    await asyncio.sleep(pause)
                    waited += pause
                    continue
                self.metrics.inc("tandem_requests_rejected_total", reason="queue_full")
                raise EngineOverloaded(f"every engine replica is busy and the queue is full ({e}); "
                                       f"retry later") from None
            except (*LOST, EngineDead) as e:
                settled = True
                if resumes >= self.max_resumes:
                    raise EngineDead(f"the engine replica was lost {resumes + 1} times: {e}") from None
                resumes += 1
                self.metrics.inc("tandem_requests_resumed_total")
                log.warning("request %s: engine replica lost after %d tokens (%s); resuming on another",
                            request_id, len(produced), type(e).__name__)
            finally:
                if not settled:     # the client went away, or a stop string ended it: abort there
                    stream.cancel()
        # Lost right after its last token, before the replica said it was the last.
        out = RequestOutput(request_id, None, prompt_token_ids, [CompletionOutput(0, "", produced, "length")], True)
        yield StreamDelta(out, "", [], [], 0)
