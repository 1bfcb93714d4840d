"""One /metrics for the whole application: engine replicas publish their series, the
router serves them merged with its own.

Each engine replica writes its registry's exposition text to Ray's GCS key-value
store every second (key: the replica's id). The router's registry (`ClusterRegistry`)
reads every fresh snapshot when scraped and merges the families by name, each replica's
samples labelled `replica`, so `curl /metrics` shows both pools' queues, KV usage and
transfer counters beside the request latencies measured at the router. The same series
also go through Ray's metrics pipeline (ray_ prefix), which is what KubeRay scrapes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.experimental import internal_kv

log = logging.getLogger(__name__)
NAMESPACE = "tandem_metrics"
STALE_S = 10.0      # a replica silent this long is gone (or replaced)


def _key(app: str, replica: str) -> bytes:
    return f"{app}/{replica}".encode()


class MetricsPublisher:
    """A replica's thread that publishes its registry every `interval_s`."""

    def __init__(self, app: str, replica: str, registry: CollectorRegistry, before=None,
                 interval_s: float = 1.0) -> None:
        self.key, self.registry, self.before, self.interval_s = _key(app, replica), registry, before, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.before is not None:
                    self.before()
                text = generate_latest(self.registry).decode()
                internal_kv._internal_kv_put(self.key, json.dumps({"t": time.time(), "text": text}),
                                             overwrite=True, namespace=NAMESPACE)
            except Exception:       # metrics must never take a replica down
                log.exception("publishing metrics failed")

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):    # the GCS may be gone already at shutdown
            internal_kv._internal_kv_del(self.key, namespace=NAMESPACE)


class ClusterRegistry(CollectorRegistry):
    """The router's own metrics merged with every engine replica's latest snapshot."""

    def __init__(self, app: str) -> None:
        super().__init__()
        self.prefix = f"{app}/".encode()

    def _snapshots(self) -> dict[str, str]:
        out = {}
        now = time.time()
        for key in internal_kv._internal_kv_list(self.prefix, namespace=NAMESPACE):
            raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is None:
                continue
            snap = json.loads(raw)
            if now - snap["t"] < STALE_S:
                out[key[len(self.prefix):].decode()] = snap["text"]
        return out

    def collect(self):
        families = {f.name: f for f in super().collect()}
        try:
            snapshots = self._snapshots()
        except Exception:           # the GCS is unreachable: serve what the router has
            log.exception("reading replica metrics failed")
            snapshots = {}
        for replica, text in snapshots.items():
            for fam in text_string_to_metric_families(text):
                if fam.name.endswith("_created"):     # creation times say nothing merged
                    continue
                samples = [s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples]
                if fam.name in families:
                    families[fam.name].samples.extend(samples)
                else:
                    fam.samples = samples
                    families[fam.name] = fam
        yield from families.values()
