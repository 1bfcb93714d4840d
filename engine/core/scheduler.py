"""Token-budget scheduling with no prefill/decode phases.

Each request only has `num_computed_tokens` and a token list; a step gives every
request some of its uncomputed tokens under the budget, so chunked prefill and mixed
prefill/decode batches fall out. Running requests go first, in arrival order; when the
pool runs out of blocks the most recently admitted request is preempted (its blocks
freed, to be recomputed later, mostly from the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

from engine.core.scheduler_output import NewRequestData, SchedulerOutput
from engine.kv_cache import KVCacheManager
from engine.kv_transfer import KVTransferHook, is_consumer, is_producer
from engine.kv_transfer_params import KVTransferParams
from engine.request import Request, RequestStatus
from engine.spec.settings import drafts_at


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    kv_load_failure_policy: str = "recompute"   # or "fail": see engine/kv_transfer.py
    num_speculative_tokens: int = 0             # K drafts per decoding request (0 = off)
    # ((min_batch, k), ...): fewer drafts at larger batches (engine/spec/settings.py)
    num_speculative_tokens_per_batch: tuple[tuple[int, int], ...] = ()


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished: set[str] = set()   # rows the runner still holds
        self.num_preemptions = 0
        # Async scheduling: tokens being sampled by steps in flight, per request. They
        # count as known tokens (placeholders) when scheduling; the real token replaces
        # one when its step's output arrives.
        self.pending: dict[str, int] = {}
        # Full blocks already registered in the prefix cache, per request: a step only
        # hashes and registers blocks that filled since (not every block every step).
        self._cached_full: dict[str, int] = {}
        # Tokens each request received from the last output (speculative decoding: more than one).
        self.num_new_tokens: dict[str, int] = {}
        # KV transfer (disaggregated prefill/decode); see engine/kv_transfer.py.
        self.kv_transfer: KVTransferHook | None = None
        self.loading: dict[str, Request] = {}   # consumer: remote KV being read
        self.held: dict[str, Request] = {}      # producer: finished, blocks kept for a reader
        self.remote_admitted: list[Request] = []    # loaded (or falling back) since last step
        self.remote_failed: list[tuple[Request, str]] = []   # failed under the fail policy
        self.num_recomputed = 0

    # -- admission -----------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if is_consumer(req):
            if self.kv_transfer is None:
                raise ValueError("this engine has no KV-transfer connector; it cannot take a remote prefill")
            req.status = RequestStatus.WAITING_FOR_REMOTE_KV
            # Arrival time, for the hook to judge how much of the producer's lease is left.
            req.kv_transfer_params = replace(req.kv_transfer_params, received=time.monotonic())
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
        return len(self.waiting) + len(self.running) + len(self.loading)

    # -- one step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished)
        self._finished = set()
        if self.kv_transfer is not None:
            self._poll_transfers()
        budget = self.config.max_num_batched_tokens
        preempted = False
        # Drafts per decoding request this step, by the rule on the running batch; each
        # request's count goes into spec_token_counts, so the optimistic pending counts
        # and their correction use the K this step verifies.
        step_k = drafts_at(self.config.num_speculative_tokens, self.config.num_speculative_tokens_per_batch,
                           len(self.running))

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            pending = self.pending.get(req.request_id, 0)
            n = min(req.num_tokens + pending - req.num_computed_tokens, budget)
            if n <= 0 or (pending and self._finishes_on_length(req, pending)):
                # Everything computed and the sampled token pending, or the pending
                # tokens finish it anyway: nothing to do.
                i += 1
                continue
            new = not req.runner_block_counts    # just loaded from a remote prefill
            k = self._num_drafts(req, n, pending, budget, new, step_k)
            n += k
            while not self.kv.allocate(req, n + self._lookahead(req.num_computed_tokens + n)):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            else:
                self._schedule(req, n, out, new=new, num_drafts=k)
                if k:
                    out.spec_token_counts[req.request_id] = k
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing behind it fits either

        # Admit waiting requests only when nobody was preempted this step, so a
        # preempted request is not starved by newcomers taking its blocks.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) + len(self.loading) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.sampling_params.prompt_logprobs is not None and req.status != RequestStatus.WAITING_FOR_REMOTE_KV:
                cached, num_cached = [], 0      # every prompt position is computed, for its logprobs
            else:
                cached, num_cached = self.kv.find_cached_prefix(req)
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                if not self._start_load(req, cached, num_cached):
                    break
                continue
            n = req.num_tokens - num_cached
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv.allocate(req, n + self._lookahead(num_cached + n), cached):
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

    def _schedule(self, req: Request, n: int, out: SchedulerOutput, new: bool, num_drafts: int = 0) -> None:
        rid = req.request_id
        if new:
            out.new_reqs.append(NewRequestData(
                req_id=rid, token_ids=req.all_token_ids, num_computed_tokens=req.num_computed_tokens,
                block_ids=[list(b) for b in self.kv.block_ids(rid)],
                sampling_params=req.sampling_params, seed=req.seed, num_prompt_tokens=req.num_prompt_tokens))
        else:
            ids = self.kv.block_ids(rid)
            fresh = [g[k:] for g, k in zip(ids, req.runner_block_counts)]
            if any(fresh):
                out.new_block_ids[rid] = fresh
        req.runner_block_counts = [len(g) for g in self.kv.block_ids(rid)]
        out.num_scheduled_tokens[rid] = n
        req.num_computed_tokens += n
        pending = self.pending.get(rid, 0)
        if req.num_computed_tokens >= req.num_tokens + pending:
            # This step samples a token; with drafts, optimistically every draft is
            # accepted (update_from_output takes back what the device rejected).
            self.pending[rid] = pending + 1 + num_drafts
        # Only blocks of known tokens are hashed (a placeholder's value is not known yet).
        known = min(req.num_computed_tokens, req.num_tokens)
        if new or known // self.kv.block_size > self._cached_full.get(rid, 0):
            self.kv.cache_full_blocks(req, known)
            self._cached_full[rid] = known // self.kv.block_size

    # -- speculative decoding ---------------------------------------------------------
    def _num_drafts(self, req: Request, n: int, pending: int, budget: int, new: bool, step_k: int) -> int:
        """Drafts to verify this step: a decoding request (its one new token is the last
        sampled, or under async scheduling the one the step in flight samples last) gets
        up to step_k (K, or fewer at large batches), fewer near its token budget or
        max_model_len (every position must fit: k accepted + 1, after the `pending`
        tokens of the step in flight, counted as if all its drafts were accepted). Not
        fewer near max_tokens: tokens past it are dropped by the stop rule, and a batch
        whose requests verify the same k replays that k's CUDA graph, where one request
        with fewer drafts would send the whole step down the eager path. A request new
        to the runner has no drafts on the device yet."""
        if not step_k or n != 1 or new:
            return 0
        left = self.config.max_model_len - req.num_tokens - pending
        return max(0, min(step_k, budget - 1, left - 1))

    def _lookahead(self, num_tokens: int) -> int:
        """KV slots past the step's tokens that the draft head writes (its K-1 mask rows),
        within max_model_len (the runner writes nothing beyond)."""
        K = self.config.num_speculative_tokens
        return max(0, min(K - 1, self.config.max_model_len - num_tokens)) if K else 0

    def _finishes_on_length(self, req: Request, pending: int) -> bool:
        return (len(req.output_token_ids) + pending >= req.sampling_params.max_tokens
                or req.num_tokens + pending >= self.config.max_model_len)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.pending.pop(req.request_id, None)   # its in-flight token is dropped; resampled later
        self._cached_full.pop(req.request_id, None)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.finished_req_ids.add(req.request_id)   # the runner drops its row
        out.num_scheduled_tokens.pop(req.request_id, None)
        out.spec_token_counts.pop(req.request_id, None)
        self.waiting.appendleft(req)

    # -- KV transfer -----------------------------------------------------------------
    def _start_load(self, req: Request, cached: list[int], num_cached: int) -> bool:
        """Allocate local blocks for a remotely prefilled prompt and start reading into
        them; takes no token budget (nothing is computed here)."""
        n = req.num_prompt_tokens - num_cached
        if not self.kv.allocate(req, n, cached):
            return False
        self.waiting.popleft()
        req.num_cached_tokens = num_cached
        self.loading[req.request_id] = req
        self.kv_transfer.start_load(req, list(self.kv.block_ids(req.request_id)[0]), num_cached,
                                    state_slot=self._state_slot(req.request_id))
        return True

    def _state_slot(self, rid: str) -> int | None:
        """The request's Mamba state slot (hybrid models), else None."""
        ids = self.kv.block_ids(rid)
        return ids[1][0] if len(ids) > 1 and ids[1] else None

    def _poll_transfers(self) -> None:
        for rid in self.kv_transfer.released():
            held = self.held.pop(rid, None)
            if held is not None:
                self.kv.free(held)
        done, failed = self.kv_transfer.finished_loads()
        for rid in done:
            req = self.loading.pop(rid, None)
            if req is None:
                continue
            # The prompt's KV is here; the producer's first token is computed next. With
            # speculation the last prompt position is computed again with it: its taps
            # give the draft head the row of the first token (the head's KV is not
            # handed off), and that first step verifies no drafts (none exist yet).
            req.num_computed_tokens = req.num_prompt_tokens - (1 if self.config.num_speculative_tokens else 0)
            self.kv.cache_full_blocks(req, req.num_computed_tokens)
            req.status = RequestStatus.RUNNING
            req.runner_block_counts = []
            self.running.append(req)
            self.remote_admitted.append(req)
        for rid, reason in failed.items():
            req = self.loading.pop(rid, None)
            if req is None:
                continue
            self.kv.free(req)
            req.kv_transfer_params = replace(req.kv_transfer_params, do_remote_prefill=False, error=reason)
            if self.config.kv_load_failure_policy == "recompute":
                # Prefill it here: prompt and the producer's first token, from scratch
                # (or from local prefix hits); the sampler's noise does not depend on
                # which engine computes, so the answer stays the same.
                self.num_recomputed += 1
                req.status = RequestStatus.WAITING
                req.num_computed_tokens = 0
                self.waiting.appendleft(req)
                self.remote_admitted.append(req)
            else:
                req.status = RequestStatus.FINISHED_ABORTED
                del self.requests[rid]
                self.remote_failed.append((req, reason))

    # -- results -------------------------------------------------------------------
    def update_from_output(self, sampled: dict[str, int], spec_tokens: dict[str, list[int]] | None = None,
                           drafted: dict[str, int] | None = None) -> list[Request]:
        """Append each request's sampled token (with speculation: its accepted drafts and
        the bonus token, `spec_tokens`; `drafted`: the drafts each request verified in
        that step, its SchedulerOutput's spec_token_counts), apply stop rules after each;
        returns the requests that changed (got tokens or finished) in batch order, and
        leaves how many tokens each got in `num_new_tokens`."""
        changed = []
        self.num_new_tokens = {}
        drafted = drafted or {}
        for rid, token in sampled.items():
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue   # finished, aborted or preempted while its step was in flight
            # The step counted 1 + its drafts as pending (optimistic).
            left = self.pending.get(rid, 0) - 1 - drafted.get(rid, 0)
            if left > 0:
                self.pending[rid] = left
            else:
                self.pending.pop(rid, None)
            tokens = spec_tokens.get(rid, [token]) if spec_tokens else [token]
            if rid in drafted:
                # The device's accepted count is authoritative: the KV of rejected drafts
                # stays in the request's slots and is overwritten when those positions
                # are computed again, so only the count of computed tokens goes back.
                req.num_computed_tokens -= drafted[rid] - (len(tokens) - 1)
            for n, token in enumerate(tokens, 1):
                req.output_token_ids.append(token)
                reason = self._stop_reason(req, token)
                if reason is not None:
                    self._finish(req, reason)
                    break
            self.num_new_tokens[rid] = n
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
        rid = req.request_id
        self.pending.pop(rid, None)
        self._cached_full.pop(rid, None)
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._finished.add(rid)
        elif rid in self.loading:
            self.kv_transfer.cancel_load(rid)    # no READ may land in freed blocks
            del self.loading[rid]
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        del self.requests[rid]
        if status == RequestStatus.FINISHED_LENGTH and self.kv_transfer is not None and is_producer(req):
            # A prefill for another engine: keep the blocks until the reader is done.
            # A hybrid model's state slot (the state after the prompt) stays with them.
            handle = self.kv_transfer.hold(req, list(self.kv.block_ids(rid)[0]), state_slot=self._state_slot(rid))
            req.kv_transfer_params = KVTransferParams(do_remote_prefill=True, handle=handle)
            self.held[rid] = req
            return
        self.kv.free(req)
