"""Helpers for the tests that point real outside tools (Debian's prometheus and chromium)
at a running tandem server: find the tools, start the server on the embedded default
model, send it a short load, and read the Grafana dashboard's own queries.

The tools are system packages, not wheels. Locally a test skips when one is missing;
with TANDEM_REQUIRE_SYSTEM_TOOLS=1 (which .ci/run sets after installing them) it fails
instead, so CI can never skip them silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_BUILDER = REPO / "deploy" / "dashboards" / "build_dashboards.py"
REQUIRE_TOOLS = "TANDEM_REQUIRE_SYSTEM_TOOLS"
MODEL = "tandem-default"


def system_tool(name: str, package: str, candidates: tuple[str, ...] = ()) -> str:
    """Path of executable `name` (Debian package `package`), or skip / fail."""
    for path in (shutil.which(name), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    reason = f"{name} is not installed (apt-get install {package}; .ci/run installs it)"
    if os.environ.get(REQUIRE_TOOLS) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_TOOLS}=1 forbids skipping this test")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tandem_server(ttft_ms: float = 10_000, itl_ms: float = 1_000) -> Iterator[str]:
    """The OpenAI API over a real AsyncEngine on the embedded default model (uvicorn in a
    thread), yielding its base URL. The SLOs are loose so that a CPU run has goodput."""
    import uvicorn

    from cluster.metrics import Metrics
    from cluster.openai_api import build_api
    from cluster.request_metrics import SLO
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    engine = AsyncEngine(EngineConfig(max_model_len=256, max_num_seqs=8), max_waiting=32)
    app = build_api(engine, MODEL, Metrics(MODEL, "colocated"), SLO(ttft_ms=ttft_ms, itl_ms=itl_ms))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "tandem server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


def send_load(url: str, requests: int = 12, rate: float = 4.0, max_tokens: int = 12) -> int:
    """Open-loop load with the official openai client: `requests` completions started
    `1/rate` seconds apart, of a few prompt lengths. Returns the number that finished."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            r = client.completions.create(model=MODEL, prompt="tell me a story " * (1 + i % 4),
                                          max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == max_tokens
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = []
    for i in range(requests):
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(1 / rate)
    for t in threads:
        t.join(timeout=120)
    assert not errors, f"{len(errors)} requests failed, first: {errors[0]!r}"
    return requests


def grafana_builder():
    """deploy/dashboards/build_dashboards.py, the source of the Grafana dashboard."""
    spec = importlib.util.spec_from_file_location("build_dashboards", DASHBOARD_BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def substitute(expr: str, **variables: str) -> str:
    """A Grafana query with its variables replaced as for a standalone server (no `ray_`
    prefix, every model and pool); `variables` give $__rate_interval and friends."""
    values = {"prefix": "", "model_name": ".*", "pool": ".*", **variables}
    expr = expr.replace("${prefix}", values.pop("prefix"))
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("$" + name, values[name])
    assert "$" not in expr, f"unreplaced Grafana variable in {expr}"
    return expr


def grafana_query(panel_title: str, legend_start: str, **variables: str) -> str:
    """The PromQL of one line of the Grafana dashboard (panel title, legend prefix)."""
    panel = next(p for p in grafana_builder().panels() if p.get("title") == panel_title)
    target = next(t for t in panel["targets"] if t["legendFormat"].startswith(legend_start))
    return substitute(target["expr"], **variables)
