"""The OpenAI API in front of a prefill engine and a decode engine (NIXL between them),
driven by the official openai client: the same answers as one colocated engine, the
KV-transfer metrics counted, and a dead prefill side handled by recomputing."""

from __future__ import annotations

import time

import openai
import pytest

from cluster.kv_transfer_metrics import KVTransferMetrics
from cluster.metrics import Metrics
from cluster.openai_api import build_api
from cluster.request_metrics import SLO
from disagg.connector import connector_spec
from disagg.prefill_decode import PrefillDecodeEngine, prefill_request
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from tests.cluster.conftest import Served

MODEL = "tandem-default"
PROMPTS = ["a", "The quick brown fox jumps", "0123456789abcde", "x" * 16, "y" * 17, "hello " * 9]


def engine(metrics: Metrics | None = None) -> AsyncEngine:
    config = EngineConfig(max_model_len=256, max_num_seqs=4)
    if metrics is None:
        return AsyncEngine(config, max_waiting=8)
    observer = KVTransferMetrics(metrics, config.kv_load_failure_policy)
    return AsyncEngine(config, max_waiting=8,
                       kv_transfer=connector_spec(), kv_observer=observer)


@pytest.fixture(scope="module")
def servers():
    slo = SLO(ttft_ms=60000, itl_ms=60000)
    colocated = engine()
    metrics = Metrics(MODEL, "decode")
    prefill, decode = engine(Metrics(MODEL, "prefill")), engine(metrics)
    state = {"prefill_up": True}

    async def call_prefill(request: dict) -> dict:
        if not state["prefill_up"]:
            raise ConnectionError("prefill replica unreachable")
        return await prefill_request(prefill, request)

    pd = PrefillDecodeEngine(decode, call_prefill, decode.kv_observer)
    up = [Served(build_api(colocated, MODEL, Metrics(MODEL, "colocated"), slo)),
          Served(build_api(pd, MODEL, metrics, slo))]
    yield up[0].url, up[1].url, prefill, decode, pd, state
    for served in up:
        served.stop()
    for e in (colocated, prefill, decode):
        e.shutdown()


def complete(base: str, prompt: str, max_tokens: int, stream: bool = False, **kw):
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    if stream:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, **kw)
        return "".join(c.choices[0].text for c in chunks)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def blocks_free(e: AsyncEngine) -> bool:
    deadline = time.time() + 10
    while time.time() < deadline:
        if e.core.kv.num_free_blocks == e.core.num_blocks and not e.core.scheduler.held:
            return True
        time.sleep(0.05)
    return False


def test_pd_answers_equal_colocated(servers):
    colocated, pd_url, prefill, decode, pd, _ = servers
    for prompt in PROMPTS:
        assert complete(pd_url, prompt, 12) == complete(colocated, prompt, 12), prompt
    assert complete(pd_url, PROMPTS[1], 12, stream=True) == complete(colocated, PROMPTS[1], 12, stream=True)
    assert complete(pd_url, PROMPTS[1], 1) == complete(colocated, PROMPTS[1], 1)      # prefill alone
    stats = decode.kv_transfer.stats
    assert stats.transfers_total >= len(PROMPTS) and stats.bytes_total > 0 and not stats.failures
    assert blocks_free(prefill) and blocks_free(decode)


def test_pd_metrics_are_exported(servers):
    _, pd_url, *_ = servers
    complete(pd_url, "metrics please", 4)
    import httpx
    text = httpx.get(pd_url + "/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("tandem_kv_transfer_bytes_total{")]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) > 0
    assert "tandem_kv_transfer_seconds_count{" in text


def test_prefill_pool_down_recomputes(servers):
    colocated, pd_url, prefill, decode, pd, state = servers
    state["prefill_up"] = False
    try:
        before = pd.num_local_prefills
        assert complete(pd_url, PROMPTS[2], 8) == complete(colocated, PROMPTS[2], 8)
        assert pd.num_local_prefills == before + 1
    finally:
        state["prefill_up"] = True
    assert blocks_free(decode)
