"""The OpenAI API, driven with the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

MODEL = "tandem-default"


@pytest.fixture(scope="module")
def client(api_server):
    url, _ = api_server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)


def test_models_and_health(client, api_server):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{api_server[0]}/health").json() == {"status": "ok"}


def test_completion_matches_offline_engine(client, default_llm):
    from engine import SamplingParams
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    ref = default_llm.generate(["Hello there"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.choices[0].finish_reason == "length"


def test_streaming_completion_concatenates_to_the_same_text(client):
    kw = dict(model=MODEL, prompt="stream me", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stream_and_logprobs(client):
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, seed=3)
    assert r.choices[0].message.role == "assistant"
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(len(x.top_logprobs) == 2 for x in lps)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 seed=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_seeded_sampling_is_reproducible_over_http(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=8, temperature=1.0, seed=42, extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


@pytest.mark.parametrize("kwargs, status", [
    (dict(max_tokens=-1), 400), (dict(temperature=-1), 400), (dict(top_p=2.0), 400),
    (dict(prompt=""), 400), (dict(prompt="x" * 400), 400), (dict(max_tokens=10**6), 400), (dict(model="other"), 404), (dict(n=2), 400),
])
def test_bad_requests_get_openai_errors(client, kwargs, status):
    body = dict(model=MODEL, prompt="ok", max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**body)
    assert e.value.status_code == status
    assert e.value.body["message"]


def test_malformed_json_and_missing_key(api_server):
    url, _ = api_server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "no model"}, headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401


def test_overload_is_refused_fast_and_nothing_leaks(api_server):
    url, engine = api_server

    async def flood():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sekret"}, timeout=120) as c:
            body = {"model": MODEL, "prompt": "load", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(24)])

    codes = [r.status_code for r in asyncio.run(flood())]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert not engine.core.has_unfinished()
    assert engine.core.kv.num_free_blocks == engine.core.num_blocks


def test_client_disconnect_aborts_and_frees_blocks(api_server):
    url, engine = api_server
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": "Bearer sekret"},
                      json={"model": MODEL, "prompt": "long", "max_tokens": 200, "ignore_eos": True,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    for _ in range(100):
        if not engine.core.has_unfinished():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not engine.core.has_unfinished()
    assert engine.core.kv.num_free_blocks == engine.core.num_blocks


def test_stop_strings_over_http(client):
    kw = dict(model=MODEL, prompt="stop over http", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[3:5]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == full[:full.index(stop)]


def _count(text: str, series: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def test_metrics_counts_equal_the_requests_sent(api_server, client):
    before = httpx.get(f"{api_server[0]}/metrics").text
    for i in range(5):
        client.completions.create(model=MODEL, prompt=f"count me {i}", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{api_server[0]}/metrics").text
    for series in ("tandem_time_to_first_token_seconds_count", "tandem_e2e_request_latency_seconds_count",
                   "tandem_requests_slo_met_total"):
        assert _count(text, series) - _count(before, series) == 5, series
    assert _count(text, "tandem_inter_token_latency_seconds_count") - \
        _count(before, "tandem_inter_token_latency_seconds_count") == 10
    for name in ("tandem_time_to_first_token_seconds_bucket", "tandem_inter_token_latency_seconds_bucket",
                 "tandem_e2e_request_latency_seconds_count", "tandem_requests_slo_met_total",
                 "tandem_num_requests_running", "tandem_kv_cache_usage_perc", "tandem_generation_tokens_total"):
        assert name in text, name
    assert 'le="1.0"' in text and 'le="0.1"' in text     # SLO thresholds are bucket edges
