"""What the served expert-parallel tests share: the module's app on its own local Ray,
waiting for it to answer, a steady stream of requests, the scale route, /metrics lines
and the placement groups Ray holds."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import ray

from tests.ray_cluster import local_serve_app, wait_until

MODEL = "tandem-default"
PROMPTS = ["Experts, spread out.", "a second, somewhat longer prompt for the other rank", "third"]


@contextmanager
def served_app(args: dict, num_cpus: int = 3) -> Iterator[str]:
    """The app of `args` as "tandem" at / on a local Ray of its own; yields its URL once it answers."""
    cache = {"env_vars": {"TANDEM_CACHE": os.environ["TANDEM_CACHE"]}}
    with local_serve_app(args, num_cpus, runtime_env=cache) as url:
        wait_answering(url, MODEL, "ready?")
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def created_groups() -> list[dict]:
    return [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]


def wait_answering(url: str, model: str, prompt) -> None:
    def ready():
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1},
                           timeout=60)
            return r.status_code == 200, r.text
        except httpx.HTTPError as e:
            return False, repr(e)
    wait_until(ready, "the EP app to answer", 300)


def metric_lines(url: str, name: str) -> list[tuple[str, float]]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
            if line.startswith(name + "{")]


class SteadyStream:
    """Requests one after another from two threads until stopped; every answer kept."""

    def __init__(self, url: str) -> None:
        self.c = client(url)
        self.results: list[tuple[str, str | Exception]] = []
        self.spans: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = i
        while not self.stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            start = time.monotonic()
            try:
                text = self.c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
                self.results.append((prompt, text.choices[0].text))
            except Exception as e:  # noqa: BLE001  (kept: the test fails on it below)
                self.results.append((prompt, e))
            self.spans.append((start, time.monotonic()))

    def wait_more(self, n: int = 2) -> None:
        """Wait for n answers more than it holds now."""
        want = len(self.results) + n
        wait_until(lambda: (len(self.results) >= want, f"{len(self.results)} answers"), f"{n} more answers", 60)

    def overlapping(self, start: float, end: float) -> int:
        """Requests in flight at some time in [start, end]."""
        return sum(1 for s, e in self.spans if s <= end and e >= start)

    def finish(self) -> list[tuple[str, str | Exception]]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        return self.results

    def check(self, want: dict[str, str], during: int, spans: list[tuple[float, float]]) -> None:
        """After finish(): every answer is `want`'s text, more came after the first `during`,
        and requests were in flight across each of `spans` (the scales)."""
        failed = [(p, r) for p, r in self.results if isinstance(r, Exception) or r != want[p]]
        assert not failed, failed[:3]
        assert len(self.results) > during > 0, (len(self.results), during)
        assert all(self.overlapping(*span) for span in spans), spans


def wait_idle(url: str, pool: str | None = None) -> None:
    """Wait for every rank's KV blocks to be free again and no request running (of `pool`
    only, where given)."""
    def idle():
        series = metric_lines(url, "tandem_kv_cache_usage_perc") + metric_lines(url, "tandem_num_requests_running")
        values = [v for labels, v in series if pool is None or f'pool="{pool}"' in labels]
        return bool(values) and all(v == 0 for v in values), str(series)
    wait_until(idle, "every rank's KV blocks free again", 30)


def scale(url: str, n, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/scale_elastic_ep", json={"new_data_parallel_size": n}, timeout=timeout)


