"""/dashboard in front of disaggregated prefill and decode engines (NIXL between them):
the KV-transfer panel, which says "no data" on a colocated server, fills in from the
connector's own metrics, and the page reads the decode engine through the PD engine."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from cluster.metrics import Metrics
from cluster.openai_api import build_api
from cluster.request_metrics import SLO
from tests.cluster.conftest import Served
from tests.cluster.test_pd_api import MODEL, engine

pytest.importorskip("nixl", reason="the NIXL connector needs the nixl package")


@pytest.fixture(scope="module")
def pd_url():
    from disagg.prefill_decode import PrefillDecodeEngine, prefill_request

    metrics = Metrics(MODEL, "decode")
    prefill, decode = engine(Metrics(MODEL, "prefill")), engine(metrics)

    async def call_prefill(request: dict) -> dict:
        return await prefill_request(prefill, request)

    pd = PrefillDecodeEngine(decode, call_prefill, decode.kv_observer)
    served = Served(build_api(pd, MODEL, metrics, SLO(ttft_ms=60000, itl_ms=60000)))
    yield served.url
    served.stop()
    for e in (prefill, decode):
        e.shutdown()


def test_kv_transfer_panel_has_data_in_pd_mode(pd_url):
    client = openai.OpenAI(base_url=f"{pd_url}/v1", api_key="none", max_retries=0)
    for i in range(4):
        r = client.completions.create(model=MODEL, prompt="hello " * (8 + 10 * i), max_tokens=6,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 6
    deadline = time.monotonic() + 20
    while True:
        body = httpx.get(f"{pd_url}/dashboard/data").json()
        panels = {p["id"]: p for p in body["panels"]}
        if panels["kv_bandwidth"]["points"] and panels["goodput"]["points"]:
            break
        assert time.monotonic() < deadline, "the KV-transfer panel got no data"
        time.sleep(0.3)
    bandwidth = panels["kv_bandwidth"]["series"]
    assert [s["name"] for s in bandwidth] == ["decode"]     # bytes are counted by the decode pool
    assert max(v for v in bandwidth[0]["values"] if v is not None) > 0
    assert panels["kv_failures"]["points"] == 0              # nothing failed, nothing recomputed
    assert max(v for s in panels["ttft"]["series"] for v in s["values"] if v is not None) > 0
    assert [s["name"] for s in panels["requests"]["series"]] == ["running decode", "waiting decode"]
