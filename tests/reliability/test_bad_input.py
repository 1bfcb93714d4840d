"""Every input that once broke or confused the server, through the real application:
each gets a 400 (or 413) in OpenAI's error shape naming the field, the engines live on,
and requests in flight are untouched."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.reliability.conftest import MODEL, REPORT, complete, replica_gauges, stream_completion

BAD_BODIES = [
    ({"prompt": "hi", "top_k": 9223372036854775808}, "top_k"),       # past int64: stopped the engine
    ({"prompt": "hi", "top_k": 2**31}, "top_k"),                      # wrapped in the int32 table
    ({"prompt": "hi", "top_k": 2**40}, "top_k"),
    ({"prompt": "hi", "top_k": 10**6}, "top_k"),                      # above the vocabulary
    ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": "hi", "max_tokens": 2**31}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": [False]}, "prompt"),                                  # was taken as token 0
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "stop": ["x"] * 1000}, "stop"),                 # unbounded stop list
    ({"prompt": "hi", "stop": "y" * 10000}, "stop"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "logit_bias": {"1000000": 1}}, "logit_bias"),  # beyond the vocabulary
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),   # was ignored
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES, ids=[f for _, f in BAD_BODIES])
def test_bad_fields_get_a_400_naming_the_field(cluster, body, field):
    r = complete(cluster, **body) if "prompt" not in body else complete(cluster, body.pop("prompt"), **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert field in err["message"] and (err["param"] or field).startswith(field), err


@pytest.mark.parametrize("raw", [b'{"model": "tandem-default", "prompt": "hi", "temperature": NaN}',
                                 b'{"model": "tandem-default", "prompt": "hi", "temperature": Infinity}',
                                 b'{"model": "tandem-default", "prompt": "hi", "top_p": -Infinity}'])
def test_non_finite_floats_are_refused(cluster, raw):
    REPORT.sent += 1
    r = httpx.post(f"{cluster}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]


def test_lone_surrogates_are_a_400_not_a_500(cluster):
    REPORT.sent += 2
    raw = b'{"model": "tandem-default", "prompt": "a\\ud800b"}'
    r = httpx.post(f"{cluster}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and ("unicode" in err["message"]
                                                                   or "surrogate" in err["message"]), err
    raw = b'{"model": "tandem-default", "messages": [{"role": "user", "content": "\\udfff"}]}'
    r = httpx.post(f"{cluster}/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_unreadable_bodies_get_openai_errors(cluster):
    REPORT.sent += 3
    for raw in (b"\xff\xfe not utf-8", b"{not json", b'["a list"]'):
        r = httpx.post(f"{cluster}/v1/completions", content=raw, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, (raw, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == 400


def test_max_completion_tokens_zero_is_refused_not_ignored(cluster):
    REPORT.sent += 1
    r = httpx.post(f"{cluster}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0,
        "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_body_over_the_limit_is_413_before_parsing(cluster):
    REPORT.sent += 2
    big = b'{"model": "tandem-default", "prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(f"{cluster}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413

    def chunks():     # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"a" * 65536
    r = httpx.post(f"{cluster}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413


def test_schema_states_the_real_codes_and_bounds(cluster):
    schema = httpx.get(f"{cluster}/openapi.json", timeout=30).json()
    op = schema["paths"]["/v1/completions"]["post"]
    assert "422" not in op["responses"] and {"400", "404", "413", "503"} <= set(op["responses"])
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Completion"}
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["logprobs"]["anyOf"][0]["maximum"] == 20 and props["model"]["enum"] == [MODEL]
    assert props["top_k"]["maximum"] <= 2**31 - 1


def test_bad_requests_never_disturb_streams_in_flight(cluster):
    """Eight streams run while every bad body above is sent; all eight finish with
    [DONE], the same replicas serve on (none was restarted), and a greedy answer is
    the same as before."""
    before = set(replica_gauges(cluster, "tandem_kv_cache_usage_perc"))
    ref = complete(cluster, "steady", max_tokens=12, temperature=0, ignore_eos=True).json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [asyncio.create_task(stream_completion(client, cluster, {
                "prompt": f"stream {i}", "max_tokens": 40, "ignore_eos": True, "temperature": 0})) for i in range(8)]
            for body, _ in BAD_BODIES:
                REPORT.sent += 1
                r = await client.post(f"{cluster}/v1/completions", json={"model": MODEL, **body})
                assert r.status_code == 400
            return await asyncio.gather(*streams)

    results = asyncio.run(main())
    for r in results:
        REPORT.failed += not r["done"]
        assert r["status"] == 200 and r["done"] and r["error"] is None and r["finish_reason"] == "length", r
    assert httpx.get(f"{cluster}/health", timeout=10).status_code == 200
    assert set(replica_gauges(cluster, "tandem_kv_cache_usage_perc")) == before
    again = complete(cluster, "steady", max_tokens=12, temperature=0, ignore_eos=True).json()["choices"][0]["text"]
    assert again == ref
