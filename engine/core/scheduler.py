"""Token-budget scheduling with no prefill/decode phases.

Each request only has `num_computed_tokens` and a token list; a step gives every
request some of its uncomputed tokens under the budget, so chunked prefill and mixed
prefill/decode batches fall out. Running requests go first, in arrival order; when the
pool runs out of blocks the most recently admitted request is preempted (its blocks
freed, to be recomputed later, mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.core.scheduler_output import NewRequestData, SchedulerOutput
from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished: set[str] = set()   # rows the runner still holds
        self.num_preemptions = 0

    # -- admission -----------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, req_id: str) -> Request | None:
        req = self.requests.get(req_id)
        if req is None or req.status.finished:
            return None
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished)
        self._finished = set()
        budget = self.config.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:      # everything computed (sampled token pending); nothing to do
                i += 1
                continue
            while not self.kv.allocate(req, n):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            else:
                self._schedule(req, n, out, new=False)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing behind it fits either

        # Admit waiting requests only when nobody was preempted this step, so a
        # preempted request is not starved by newcomers taking its blocks.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            cached, num_cached = self.kv.find_cached_prefix(req)
            n = req.num_tokens - num_cached
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv.allocate(req, n, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._schedule(req, n, out, new=True)
            budget -= n
        return out

    def _schedule(self, req: Request, n: int, out: SchedulerOutput, new: bool) -> None:
        rid = req.request_id
        if new:
            out.new_reqs.append(NewRequestData(
                req_id=rid, token_ids=req.all_token_ids, num_computed_tokens=req.num_computed_tokens,
                block_ids=[list(b) for b in self.kv.block_ids(rid)],
                sampling_params=req.sampling_params, seed=req.seed))
        else:
            ids = self.kv.block_ids(rid)
            fresh = [g[k:] for g, k in zip(ids, req.runner_block_counts)]
            if any(fresh):
                out.new_block_ids[rid] = fresh
        req.runner_block_counts = [len(g) for g in self.kv.block_ids(rid)]
        out.num_scheduled_tokens[rid] = n
        req.num_computed_tokens += n
        self.kv.cache_full_blocks(req, req.num_computed_tokens)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.finished_req_ids.add(req.request_id)   # the runner drops its row
        out.num_scheduled_tokens.pop(req.request_id, None)
        self.waiting.appendleft(req)

    # -- results -------------------------------------------------------------------
    def update_from_output(self, sampled: dict[str, int]) -> list[Request]:
        """Append each request's sampled token, apply stop rules; returns the requests
        that changed (got a token or finished) in batch order."""
        changed = []
        for rid, token in sampled.items():
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue   # aborted while its step was in flight
            req.output_token_ids.append(token)
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason)
            changed.append(req)
        return changed

    def _stop_reason(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        if not sp.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, req_id: str, status: RequestStatus) -> None:
        """Finish a request from outside (a stop string seen by the detokenizer)."""
        req = self.requests.get(req_id)
        if req is not None and not req.status.finished:
            self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._finished.add(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        del self.requests[req.request_id]
