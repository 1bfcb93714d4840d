"""What an engine replica tells Serve's autoscaler about its load.

Serve calls a replica's `record_autoscaling_stats` a few times per look-back window and
hands the series to the pool's policy (cluster/autoscaling.py). Counters are cumulative,
so the policy reads rates as differences over its window whatever the call interval:
prompt tokens admitted and prefilled, seconds spent with prompt work in flight (busy),
and the sum and count of gaps between a request's tokens (ITL). The prompt tokens still
waiting for their first token, the KV usage and the running batch are gauges. Measured here, at the
replica, from the requests it streams: no engine internals, any engine client.
"""

from __future__ import annotations

import time

# Names of the series, shared by the replica (which records them) and the policy.
PROMPT_TOKENS_WAITING = "prompt_tokens_waiting"
PROMPT_TOKENS_ADMITTED = "prompt_tokens_admitted"
PROMPT_TOKENS_PREFILLED = "prompt_tokens_prefilled"
PREFILL_BUSY_S = "prefill_busy_seconds"
ITL_SUM_S = "itl_seconds_sum"
ITL_COUNT = "itl_count"
KV_CACHE_USAGE = "kv_cache_usage_perc"
REQUESTS_RUNNING = "num_requests_running"


class PoolLoad:
    """One replica's prefill backlog, prefill throughput and inter-token gaps."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.waiting: dict[str, int] = {}       # request id -> prompt tokens before its first token
        self.last_token: dict[str, float] = {}  # request id -> when its last tokens came
        self.admitted = 0
        self.prefilled = 0
        self.busy_s = 0.0
        self.busy_since: float | None = None
        self.itl_sum_s = 0.0
        self.itl_count = 0

    def _busy_time(self, now: float) -> float:
        return self.busy_s + (now - self.busy_since if self.busy_since is not None else 0.0)

    def admit(self, request_id: str, prompt_tokens: int) -> None:
        now = self.clock()
        if not self.waiting:
            self.busy_since = now
        self.waiting[request_id] = prompt_tokens
        self.admitted += prompt_tokens

    def _prefill_done(self, request_id: str, counted: bool) -> None:
        n = self.waiting.pop(request_id, None)
        if n is None:
            return
        if counted:
            self.prefilled += n
        if not self.waiting and self.busy_since is not None:
            self.busy_s += self.clock() - self.busy_since
            self.busy_since = None

    def tokens(self, request_id: str, n: int) -> None:
        """`n` new tokens of a request: its first ends its prefill; later ones are gaps."""
        if n <= 0:
            return
        now = self.clock()
        last = self.last_token.get(request_id)
        if last is None:
            self._prefill_done(request_id, counted=True)
        else:
            self.itl_sum_s += now - last
            self.itl_count += n
        self.last_token[request_id] = now

    def finish(self, request_id: str) -> None:
        """The request left this replica (done, failed or cancelled)."""
        self._prefill_done(request_id, counted=False)
        self.last_token.pop(request_id, None)

    def stats(self, kv_cache_usage: float, running: int) -> dict[str, float]:
        return {PROMPT_TOKENS_WAITING: float(sum(self.waiting.values())), REQUESTS_RUNNING: float(running),
                PROMPT_TOKENS_ADMITTED: float(self.admitted), PROMPT_TOKENS_PREFILLED: float(self.prefilled),
                PREFILL_BUSY_S: self._busy_time(self.clock()),
                ITL_SUM_S: self.itl_sum_s, ITL_COUNT: float(self.itl_count), KV_CACHE_USAGE: kv_cache_usage}
