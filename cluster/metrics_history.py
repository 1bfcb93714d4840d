"""A short in-process history of the server's own metrics, for the /dashboard page.

A sampler thread snapshots the prometheus-client registry every second into a ring
buffer. Series are derived from it the way PromQL derives them from Prometheus's
storage: `rate()` over a window of counter samples, and `histogram_quantile()` over the
increase of a histogram's buckets in that window (same interpolation rules), so the page
and the Grafana dashboard show the same numbers for the same metrics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
# Sample name (e.g. tandem_request_success_total, ..._bucket) -> label set -> value.
Snapshot = dict[str, dict[Labels, float]]
Series = list[float | None]


@dataclass(frozen=True)
class Sample:
    time: float
    values: Snapshot


def snapshot(registry: CollectorRegistry, prefix: str = "tandem_") -> Snapshot:
    """The current value of every sample whose name starts with `prefix`."""
    out: Snapshot = {}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.startswith(prefix) or s.name.endswith("_created"):
                continue
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
    return out


class MetricsHistory:
    """Ring buffer of registry snapshots taken every `interval` seconds by a daemon thread.

    `before_sample` runs just before each snapshot: gauges that are only refreshed when
    someone reads them (running/waiting requests, KV usage) are set there."""

    def __init__(self, registry: CollectorRegistry, interval: float = 1.0, capacity: int = 900,
                 before_sample: Callable[[], None] | None = None) -> None:
        if interval <= 0 or capacity < 2:
            raise ValueError("interval must be > 0 and capacity >= 2")
        self.registry = registry
        self.interval = interval
        self.capacity = capacity
        self.before_sample = before_sample
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def sample_now(self) -> None:
        try:
            if self.before_sample is not None:
                self.before_sample()
            sample = Sample(time.time(), snapshot(self.registry))
        except Exception:  # a sampling hiccup must not stop the history or the server
            if not self._warned:
                log.exception("dashboard metrics sampling failed; will keep trying")
                self._warned = True
            return
        with self._lock:
            self._samples.append(sample)

    def samples(self, seconds: float | None = None) -> list[Sample]:
        with self._lock:
            samples = list(self._samples)
        if seconds is not None and samples:
            cutoff = samples[-1].time - seconds
            samples = [s for s in samples if s.time >= cutoff]
        return samples

    def start(self) -> None:
        """Start sampling (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tandem-metrics-history", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_now()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


# ---------------------------------------------------------------------------------
# Series derived from the samples, grouped by label values (like PromQL's `sum by`).


def _group(values: dict[Labels, float], by: tuple[str, ...],
           keep: Callable[[dict[str, str]], bool] | None = None) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for labels, value in values.items():
        d = dict(labels)
        if keep is not None and not keep(d):
            continue
        key = tuple(d.get(b, "") for b in by)
        out[key] = out.get(key, 0.0) + value
    return out


def _groups(samples: list[Sample], name: str, by: tuple[str, ...]) -> list[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    for s in samples:
        keys.update(_group(s.values.get(name, {}), by))
    return sorted(keys)


def counter_rate(samples: list[Sample], name: str, window: int, by: tuple[str, ...] = ("pool",)
                 ) -> dict[tuple[str, ...], Series]:
    """Per-second increase of counter `name` over the last `window` samples, summed by `by`.
    A series that did not exist yet at the window's start counted from 0 (a labelled
    counter appears on its first increment)."""
    summed = [_group(s.values.get(name, {}), by) for s in samples]
    out = {}
    for key in _groups(samples, name, by):
        series: Series = []
        for i, s in enumerate(samples):
            j = max(0, i - window)
            if j == i or key not in summed[i]:
                series.append(None)
                continue
            dt = s.time - samples[j].time
            series.append(max(0.0, summed[i][key] - summed[j].get(key, 0.0)) / dt if dt > 0 else None)
        out[key] = series
    return out


def gauge(samples: list[Sample], name: str, by: tuple[str, ...] = ("pool",),
          agg: Callable[[Iterable[float]], float] = sum) -> dict[tuple[str, ...], Series]:
    """Gauge `name` aggregated with `agg` over the series of each group."""
    out = {}
    for key in _groups(samples, name, by):
        series: Series = []
        for s in samples:
            vals = [v for labels, v in s.values.get(name, {}).items()
                    if tuple(dict(labels).get(b, "") for b in by) == key]
            series.append(agg(vals) if vals else None)
        out[key] = series
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (le, count) pairs sorted by le:
    linear interpolation inside the bucket holding the rank; the lowest bucket starts
    at 0; a rank in the +Inf bucket gives the highest finite bound. None when empty."""
    if not buckets or buckets[-1][0] != math.inf or not 0 <= q <= 1:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for i, (le, count) in enumerate(buckets):
        if count >= rank:
            if le == math.inf:
                return buckets[-2][0] if len(buckets) > 1 else None
            if i == 0 and le <= 0:
                return le
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return None


def histogram_quantile(samples: list[Sample], histogram: str, q: float, window: int,
                       by: tuple[str, ...] = ("pool",)) -> dict[tuple[str, ...], Series]:
    """The q-quantile of the observations of `histogram` made in the last `window`
    samples, per group; None where the window holds no observation."""
    name = histogram + "_bucket"
    by_le = by + ("le",)
    summed = [_group(s.values.get(name, {}), by_le) for s in samples]
    out = {}
    for key in _groups(samples, name, by):
        series: Series = []
        for i in range(len(samples)):
            j = max(0, i - window)
            if j == i:
                series.append(None)
                continue
            deltas = {float(k[-1]): summed[i][k] - summed[j].get(k, 0.0)
                      for k in summed[i] if k[:-1] == key}
            series.append(bucket_quantile(q, sorted(deltas.items())))
        out[key] = series
    return out
