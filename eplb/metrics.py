"""EPLB's numbers as plain values and callbacks, named as cluster/metrics.py names them.

A subscriber gets (kind, name, value, labels) with kind "set" (gauge), "observe"
(histogram) or "inc" (counter), which is exactly the method to call on
cluster.metrics.Metrics: `stats.forward_to(metrics)` does that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

Subscriber = Callable[[str, str, float, dict[str, str]], None]

BALANCEDNESS = "tandem_eplb_balancedness"
REBALANCES = "tandem_eplb_rebalances_total"
REBALANCE_SECONDS = "tandem_eplb_rebalance_seconds"
BYTES_MOVED = "tandem_eplb_bytes_moved_total"
STEP_HICCUP = "tandem_eplb_step_hiccup_seconds"
RANK_LOAD = "tandem_eplb_rank_load"
RANK_LOAD_RATIO = "tandem_eplb_rank_load_ratio"

HISTORY = 256            # recent rebalances and migrating-step hiccups kept: Prometheus holds the rest
MAX_LAYER_GROUPS = 8      # balancedness series per engine: deep models' layers are grouped


def layer_groups(num_layers: int, max_groups: int = MAX_LAYER_GROUPS) -> list[range]:
    """Consecutive MoE layers in at most max_groups groups of (nearly) equal size."""
    n = min(num_layers, max_groups)
    bounds = [round(i * num_layers / n) for i in range(n + 1)] if n else [0]
    return [range(a, b) for a, b in pairwise(bounds)]


@dataclass
class EplbStats:
    balancedness: list[float] = field(default_factory=list)     # per MoE layer, last measured
    rank_load: list[float] = field(default_factory=list)        # per rank, last window (pairs per layer)
    # The last HISTORY finished rebalances, and migrating steps' seconds over the usual
    # step: bounded, as a replica serves for weeks; the totals are the counters below.
    rebalance_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    step_hiccups: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    bytes_moved_total: int = 0
    num_rebalances: int = 0
    _usual_steps: deque = field(default_factory=lambda: deque(maxlen=32), repr=False)
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

    def set_load(self, per_layer: list[float], per_rank: list[float]) -> None:
        """The last aggregated window: balancedness per MoE layer (emitted per layer
        group, the group's worst layer, labelled "3" or "8-15") and the load each rank's
        slots carried."""
        self.balancedness, self.rank_load = list(per_layer), list(per_rank)
        for group in layer_groups(len(per_layer)):
            label = str(group.start) if len(group) == 1 else f"{group.start}-{group.stop - 1}"
            self._emit("set", BALANCEDNESS, min(per_layer[group.start:group.stop]), layer=label)
        mean = sum(per_rank) / len(per_rank) if per_rank else 0.0
        for rank, load in enumerate(per_rank):
            self._emit("set", RANK_LOAD, load, rank=str(rank))
            self._emit("set", RANK_LOAD_RATIO, load / mean if mean > 0 else 1.0, rank=str(rank))

    def record_step(self, seconds: float, migrating: bool) -> None:
        """A step's duration: a migrating step's excess over the recent usual steps is
        its hiccup."""
        if not migrating:
            self._usual_steps.append(seconds)
            return
        if self._usual_steps:
            usual = sorted(self._usual_steps)[len(self._usual_steps) // 2]
            hiccup = max(seconds - usual, 0.0)
            self.step_hiccups.append(hiccup)
            self._emit("observe", STEP_HICCUP, hiccup)

    def add_bytes_moved(self, n: int) -> None:
        if n > 0:
            self.bytes_moved_total += n
            self._emit("inc", BYTES_MOVED, float(n))

    def add_rebalance(self, seconds: float) -> None:
        self.rebalance_seconds.append(seconds)
        self.num_rebalances += 1
        self._emit("inc", REBALANCES, 1.0)
        self._emit("observe", REBALANCE_SECONDS, seconds)
