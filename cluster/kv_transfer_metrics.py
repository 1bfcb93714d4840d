"""KV-transfer metrics: the disagg observer, writing into the metrics registry."""

from __future__ import annotations

from cluster.metrics import Metrics


class KVTransferMetrics:
    """Counts bytes and time of every KV load, failures by reason, and (under the
    recompute policy) each failure as a request whose prefill was recomputed."""

    def __init__(self, metrics: Metrics, failure_policy: str) -> None:
        self.metrics = metrics
        self.recomputes = failure_policy == "recompute"

    def transferred(self, nbytes: int, seconds: float, descriptors: int) -> None:
        self.metrics.inc("tandem_kv_transfer_bytes_total", nbytes)
        self.metrics.observe("tandem_kv_transfer_seconds", seconds)

    def failed(self, reason: str) -> None:
        self.metrics.inc("tandem_kv_transfer_failures_total", reason=reason)
        if self.recomputes:
            self.metrics.inc("tandem_kv_transfer_recomputed_total")

    def prefill_failed(self, recomputed: bool) -> None:
        self.metrics.inc("tandem_kv_transfer_failures_total", reason="prefill")
        self.metrics.inc("tandem_kv_transfer_recomputed_total" if recomputed
                         else "tandem_kv_transfer_recompute_failures_total")
