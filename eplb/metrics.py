"""EPLB's numbers as plain values and callbacks, named as cluster/metrics.py names them.

A subscriber gets (kind, name, value, labels) with kind "set" (gauge), "observe"
(histogram) or "inc" (counter), which is exactly the method to call on
cluster.metrics.Metrics: `stats.forward_to(metrics)` does that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Subscriber = Callable[[str, str, float, dict[str, str]], None]

BALANCEDNESS = "tandem_eplb_balancedness"
REBALANCE_SECONDS = "tandem_eplb_rebalance_seconds"
BYTES_MOVED = "tandem_eplb_bytes_moved_total"


@dataclass
class EplbStats:
    balancedness: list[float] = field(default_factory=list)     # per MoE layer, last measured
    rebalance_seconds: list[float] = field(default_factory=list)  # one entry per finished rebalance
    bytes_moved_total: int = 0
    num_rebalances: int = 0
    _subscribers: list[Subscriber] = field(default_factory=list, repr=False)

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def forward_to(self, sink) -> None:
        """Record into anything with set/inc/observe(name, value, **labels), such as
        cluster.metrics.Metrics (this layer does not import it)."""
        self.subscribe(lambda kind, name, value, labels: getattr(sink, kind)(name, value, **labels))

    def _emit(self, kind: str, name: str, value: float, **labels: str) -> None:
        for fn in self._subscribers:
            fn(kind, name, value, labels)

    def set_balancedness(self, per_layer: list[float]) -> None:
        self.balancedness = list(per_layer)
        for layer, value in enumerate(per_layer):
            self._emit("set", BALANCEDNESS, value, layer=str(layer))

    def add_bytes_moved(self, n: int) -> None:
        if n > 0:
            self.bytes_moved_total += n
            self._emit("inc", BYTES_MOVED, float(n))

    def add_rebalance(self, seconds: float) -> None:
        self.rebalance_seconds.append(seconds)
        self.num_rebalances += 1
        self._emit("observe", REBALANCE_SECONDS, seconds)
