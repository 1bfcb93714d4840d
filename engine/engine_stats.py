"""An engine's load as the serving metrics and the router read it (any engine client)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.spec.stats import SpecDecodeStats


@dataclass(frozen=True)
class EngineStats:
    """An engine's load, as the serving metrics and the router read it."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float       # fraction of KV blocks in use (mean over ranks)
    spec_decode: SpecDecodeStats | None = None   # totals so far, when speculation is on

    def as_metrics(self) -> dict[str, float | dict[str, float]]:
        """Under the metric names (without the tandem_ prefix) they feed; a labelled
        series maps its label's values to numbers."""
        out: dict[str, float | dict[str, float]] = {
            "num_requests_running": self.num_running, "num_requests_waiting": self.num_waiting,
            "kv_cache_usage_perc": self.kv_cache_usage}
        if self.spec_decode is not None:
            out.update(self.spec_decode.as_metrics())
        return out
