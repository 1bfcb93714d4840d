"""The bookkeeping of an EP engine: which user request runs on which rank, under which
internal id, and what it produced so far.

A request gets a fresh internal id each time it is (re)submitted to a rank, so the
answers of a rank it left (a lost rank, a retiring one) are never mistaken for the new
run's. A restart resubmits prompt + tokens so far as the new prompt, with the tokens
still to produce, to the least loaded rank that accepts requests.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

from engine.core.engine_core import EngineCoreOutput
from engine.distributed.protocol import AddRequest, RankOutput, StepAnswer
from engine.distributed.rank_group import Rank
from engine.engine_client import ModelFiles, Prompt
from engine.engine_stats import EngineStats
from engine.kv_transfer import is_producer
from engine.kv_transfer_params import KVTransferParams
from engine.output_processor import apply_output, new_output
from engine.outputs import RequestOutput
from engine.request import Request
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer


@dataclass
class Tracked:
    """One user request as the coordinator follows it."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    result: RequestOutput
    detok: IncrementalDetokenizer
    internal_id: str = ""
    owner: str = ""
    finished: bool = False
    error: str | None = None
    # Added through the engine-client interface: the caller folds the outputs (text,
    # stop strings) and keeps the result, so the engine forgets it once finished.
    client: bool = False
    restarted: bool = False
    kv_transfer_params: KVTransferParams | None = None    # a KV hand-off, done on the owning rank

    @property
    def produced(self) -> list[int]:
        return self.result.outputs[0].token_ids


class RequestTracker:
    def __init__(self, seed: int | None) -> None:
        self.requests: dict[str, Tracked] = {}        # user id -> request, until popped
        self._by_internal: dict[str, Tracked] = {}
        self._internal_ids = (f"q{i}" for i in itertools.count())
        self._user_ids = itertools.count()
        self._rng = random.Random(seed)
        self.undelivered: list[EngineCoreOutput] = []

    # -- admission ------------------------------------------------------------------------
    def prompt_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None, files: ModelFiles,
                       limits: RequestLimits) -> Tracked:
        """A request of the offline API: this engine detokenizes and keeps the result."""
        if not isinstance(prompt, str) and (not prompt or not all(isinstance(t, int) for t in prompt)):
            raise ValueError("a prompt must be a string or a non-empty list of token ids")
        params = self._fix_seed(params)
        ids = files.encode(prompt)
        rid = request_id if request_id is not None else str(next(self._user_ids))
        self._check_new_id(rid)
        limits.check(ids, params)
        return Tracked(rid, ids, params, new_output(rid, prompt, ids, params),
                       IncrementalDetokenizer(files.tokenizer, params.stop))

    def client_request(self, req: Request) -> Tracked:
        """A request of the engine-client interface (validated): the caller detokenizes,
        applies stop strings and keeps the result."""
        self._check_new_id(req.request_id)
        params = self._fix_seed(req.sampling_params)
        # The ranks take prompts only: tokens already generated elsewhere (a resumed
        # stream) are recomputed as prompt, as a restart after a lost rank does.
        if req.output_token_ids:
            params = replace(params, max_tokens=max(params.max_tokens - len(req.output_token_ids), 1),
                             prompt_logprobs=None)
        ids = list(req.prompt_token_ids) + list(req.output_token_ids)
        return Tracked(req.request_id, ids, params, new_output(req.request_id, None, ids, params),
                       IncrementalDetokenizer(None, []), client=True, restarted=bool(req.output_token_ids),
                       kv_transfer_params=req.kv_transfer_params)

    def _fix_seed(self, params: SamplingParams) -> SamplingParams:
        # Fixed here, so a restarted request samples the same way.
        return replace(params, seed=self._rng.getrandbits(63)) if params.seed is None else params

    def _check_new_id(self, rid: str) -> None:
        if rid in self.requests and not self.requests[rid].finished:
            raise ValueError(f"request id {rid!r} is already in use")

    # -- runs on ranks ------------------------------------------------------------------

    def unfinished(self) -> list[Tracked]:
        return [t for t in self.requests.values() if not t.finished]

    def num_unfinished_on(self, name: str) -> int:
        return sum(1 for t in self.requests.values() if not t.finished and t.owner == name)

    def add(self, t: Tracked, ranks: list[Rank]) -> None:
        self.requests[t.request_id] = t
        self.submit(t, t.prompt_ids, t.params, ranks)

    def submit(self, t: Tracked, prompt_ids: list[int], params: SamplingParams, ranks: list[Rank]) -> None:
        """Queue t on the least loaded of `ranks` (ties: the first)."""
        owner = min(ranks, key=lambda r: (self.num_unfinished_on(r.name), ranks.index(r)))
        t.internal_id, t.owner = next(self._internal_ids), owner.name
        self._by_internal[t.internal_id] = t
        owner.pending_add.append(AddRequest(t.internal_id, prompt_ids, params, t.kv_transfer_params))

    def restart(self, t: Tracked, ranks: list[Rank]) -> None:
        """Resubmit t from its prompt plus the tokens it produced (its old run is gone or
        aborted); prompt logprobs were delivered with its first token, if at all."""
        done = t.produced
        self._by_internal.pop(t.internal_id, None)
        params = replace(t.params, max_tokens=max(t.params.max_tokens - len(done), 1))
        if done:
            params = replace(params, prompt_logprobs=None)
        # A lost consumer's load is recomputed; a prefill for another engine still hands
        # out its KV (from its new rank) unless it had already finished.
        if not (t.kv_transfer_params and is_producer(t) and not done):
            t.kv_transfer_params = None
        t.restarted = t.restarted or bool(done)
        self.submit(t, t.prompt_ids + done, params, ranks)

    # -- results ------------------------------------------------------------------------
    def finish(self, t: Tracked) -> None:
        t.finished = True
        t.result.finished = True
        self._by_internal.pop(t.internal_id, None)
        if t.client:
            self.requests.pop(t.request_id, None)

    def apply(self, answer: StepAnswer, engine) -> None:
        """Fold one rank's step answer into the requests (engine: what apply_output needs)."""
        for iid, error in answer.rejected:
            t = self._by_internal.get(iid)
            if t is not None:
                t.result.outputs[0].finish_reason = "error"
                t.error = error
                self.finish(t)
                self.undelivered.append(EngineCoreOutput(t.request_id, [], "error", error=error))
        for o in answer.outputs:
            t = self._by_internal.get(o.request_id)
            if t is None or t.finished:
                continue
            out = self._to_core_output(t, o)
            if o.error is not None:       # a failed KV load under the fail policy
                t.error = o.error
                t.result.outputs[0].finish_reason = o.finish_reason
                self.finish(t)
                self.undelivered.append(out)
                continue
            apply_output(engine, t.result, t.detok, out)
            if t.result.finished:
                self.finish(t)
            self.undelivered.append(out)

    @staticmethod
    def _to_core_output(t: Tracked, o: RankOutput) -> EngineCoreOutput:
        # A restarted request's prompt holds its earlier tokens: what the rank counts as
        # cached or scores as prompt is not the user's prompt.
        prompt_logprobs = None if t.restarted else o.prompt_logprobs
        cached = min(o.num_cached_tokens, len(t.prompt_ids))
        kv = KVTransferParams.from_dict(o.kv_transfer_params) if o.kv_transfer_params else None
        return EngineCoreOutput(t.request_id, list(o.new_token_ids), o.finish_reason,
                                [dict(lp) for lp in o.new_logprobs], cached, kv_transfer_params=kv, error=o.error,
                                prompt_logprobs=prompt_logprobs)

    def take_outputs(self) -> list[EngineCoreOutput]:
        out, self.undelivered = self.undelivered, []
        return out

    def pop_finished(self) -> list[RequestOutput]:
        done = [rid for rid, t in self.requests.items() if t.finished]
        return [self.requests.pop(rid).result for rid in done]


def stats_of(answers: list) -> EngineStats:
    """The engine's load from its ranks' step answers: counts summed, KV usage their mean."""
    answers = [a for a in answers if isinstance(a, StepAnswer)]
    usage = sum(a.kv_usage for a in answers) / len(answers) if answers else 0.0
    return EngineStats(sum(a.num_running for a in answers), sum(a.num_waiting for a in answers), usage)
