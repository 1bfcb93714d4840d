"""Per-request latency bookkeeping: TTFT, inter-token gaps, TPOT, end-to-end, SLOs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.metrics import Metrics


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 1000.0
    itl_ms: float = 100.0


@dataclass
class RequestTimer:
    metrics: Metrics
    slo: SLO
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.observe("tandem_time_to_first_token_seconds", now - self.start)
        else:
            # Tokens that arrive together share the gap since the last arrival.
            gap = (now - self.last) / n
            for _ in range(n):
                self.metrics.observe("tandem_inter_token_latency_seconds", gap)
        self.last = now
        self.tokens += n

    def on_finish(self, reason: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        now = time.perf_counter()
        m = self.metrics
        m.observe("tandem_e2e_request_latency_seconds", now - self.start)
        m.inc("tandem_prompt_tokens_total", prompt_tokens)
        m.inc("tandem_generation_tokens_total", self.tokens)
        m.inc("tandem_prefix_cache_queries_total", prompt_tokens)
        m.inc("tandem_prefix_cache_hits_total", cached_tokens)
        m.inc("tandem_request_success_total", finished_reason=reason)
        if self.first is None:
            return
        ttft = self.first - self.start
        tpot = (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else 0.0
        if self.tokens > 1:
            m.observe("tandem_time_per_output_token_seconds", tpot)
        if reason != "abort" and ttft * 1000 <= self.slo.ttft_ms and tpot * 1000 <= self.slo.itl_ms:
            m.inc("tandem_requests_slo_met_total")
