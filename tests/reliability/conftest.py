"""The fault suite's cluster and its report.

One real application for the whole suite: a local Ray instance (tests/ray_cluster.py:
its own temp dir, token and ports), Ray Serve on a free port, the pd topology with one
prefill replica and two decode replicas behind the router, on the embedded default
model. Limits are small (4 running + 4 waiting per replica, 8 queued at the router) so
overload is cheap to reach. `FaultReport` gathers the figures every test adds and
prints them at the end of the run; tearing the cluster down checks that every
replica's KV blocks are all free again (0 leaked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.ray_cluster import local_serve_app

MODEL = "tandem-default"
APP_ARGS = {
    "mode": "pd",
    "engine": {"max_model_len": 256, "max_num_seqs": 4, "kv_cache_memory_gb": 0.05},
    "max_waiting": 4,
    "prefill_timeout_s": 3.0,
    "health_check_period_s": 1.0,
    "max_body_bytes": 1 << 20,
    "pools": {"router": {"replicas": 1, "num_cpus": 0.1},
              "prefill": {"replicas": 1, "num_cpus": 0.1, "max_queued_requests": 4},
              "decode": {"replicas": 2, "num_cpus": 0.1, "max_queued_requests": 8}},
    "slo": {"ttft_ms": 60000, "itl_ms": 60000},
}


@dataclass
class FaultReport:
    sent: int = 0
    refused: int = 0
    refusal_latency_s: list[float] = field(default_factory=list)
    failed: int = 0              # admitted requests that did not complete
    resumed: int = 0             # streams resumed on another replica
    leaked_blocks: int | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lat = sorted(self.refusal_latency_s)
        p = (lambda q: f"{lat[min(len(lat) - 1, int(q * len(lat)))] * 1000:.0f} ms") if lat else (lambda q: "-")
        return [f"requests sent: {self.sent}",
                f"refused (503): {self.refused}, latency p50 {p(0.5)} / p99 {p(0.99)} / max {p(1.0)}",
                f"admitted requests failed or cut: {self.failed}",
                f"streams resumed on another replica: {self.resumed}",
                f"leaked KV blocks: {self.leaked_blocks}", *self.notes]


REPORT = FaultReport()


def pytest_terminal_summary(terminalreporter):
    if REPORT.sent:
        terminalreporter.write_sep("=", "fault suite figures")
        for line in REPORT.lines():
            terminalreporter.write_line(line)


def replica_gauges(url: str, name: str) -> dict[tuple[str, str], float]:
    """(pool, replica) -> value of an engine gauge, from the router's merged /metrics."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and 'replica="' in line:
            labels = dict(kv.split("=", 1) for kv in line[len(name) + 1:line.index("}")].split(","))
            out[(labels["pool"].strip('"'), labels["replica"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    """Wait until every replica reports no requests and no KV blocks in use; returns the
    last KV usage seen per replica."""
    deadline = time.monotonic() + timeout
    while True:
        usage = replica_gauges(url, "tandem_kv_cache_usage_perc")
        busy = {**replica_gauges(url, "tandem_num_requests_running"),
                **replica_gauges(url, "tandem_num_requests_waiting")}
        if usage and not any(usage.values()) and not any(busy.values()):
            return usage
        if time.monotonic() > deadline:
            return usage
        time.sleep(0.5)


@pytest.fixture(scope="session")
def cluster():
    with local_serve_app(json.loads(json.dumps(APP_ARGS)), num_cpus=2) as url:
        wait_ready(url)
        yield url
        usage = wait_idle(url)
        REPORT.leaked_blocks = sum(1 for v in usage.values() if v)   # replicas with blocks still held
    assert REPORT.leaked_blocks == 0, f"KV blocks still in use at the end: {usage}"


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):      # not listening yet
            if complete(url, "ready?", max_tokens=2).status_code == 200 and len(
                    replica_gauges(url, "tandem_kv_cache_usage_perc")) == 3:
                return
        time.sleep(1)
    raise TimeoutError("the application did not come up")


def complete(url: str, prompt, timeout: float = 60, **kw) -> httpx.Response:
    REPORT.sent += 1
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, **kw}, timeout=timeout)


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion: status, text, chunks, whether it ended with [DONE], and
    whether an error event came; time to the response head for refusals."""
    REPORT.sent += 1
    t0 = time.perf_counter()
    result = {"status": None, "text": "", "done": False, "error": None, "chunks": 0, "head_s": None}
    async with client.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "stream": True, **body}) as r:
        result["status"], result["head_s"] = r.status_code, time.perf_counter() - t0
        if r.status_code != 200:
            await r.aread()
            try:
                result["error"] = r.json().get("error")
            except ValueError:      # not our JSON: record it, the test says what it expects
                result["error"] = {"raw": r.text[:500]}
            result["retry_after"] = r.headers.get("retry-after")
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                result["done"] = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                result["error"] = obj["error"]
            else:
                result["chunks"] += 1
                result["text"] += "".join(c["text"] for c in obj["choices"])
                if obj["choices"] and obj["choices"][0]["finish_reason"]:
                    result["finish_reason"] = obj["choices"][0]["finish_reason"]
    result["e2e_s"] = time.perf_counter() - t0
    return result


def run_async(coro):
    return asyncio.run(coro)
