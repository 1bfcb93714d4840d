"""A soak of mixed traffic: streamed and whole completions and chats, seeded and
greedy, hang-ups, bad requests and bursts past capacity, for a fixed number of rounds.
Nothing admitted is lost or cut, and at the end every replica's block pool is full
again (checked when the suite's cluster is torn down)."""

from __future__ import annotations

import asyncio
import os
import random

import httpx

from tests.reliability.conftest import MODEL, REPORT, stream_completion, wait_idle

ROUNDS = int(os.environ.get("TANDEM_SOAK_ROUNDS", "6"))


async def _chat(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    REPORT.sent += 1
    r = await client.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_completion_tokens": rng.randint(1, 30), "seed": rng.randint(0, 2**40)})
    if r.status_code == 503:
        return "refused"
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    return "ok"


async def _hang_up(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    REPORT.sent += 1
    async with client.stream("POST", f"{url}/v1/completions", json={
            "model": MODEL, "prompt": "going", "max_tokens": 100, "stream": True, "ignore_eos": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and rng.random() < 0.3:
                break
    return "hung up"


async def _bad(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    REPORT.sent += 1
    body = rng.choice([{"prompt": "x", "top_k": 2**63}, {"prompt": [True]}, {"prompt": "x", "temperature": -1},
                       {"prompt": "", "max_tokens": 3}])
    r = await client.post(f"{url}/v1/completions", json={"model": MODEL, **body})
    if r.status_code == 503:       # a burst filled the pool: refused before the body is read
        return "refused"
    assert r.status_code == 400, r.text
    return "bad"


async def _stream(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    body = {"prompt": f"soak stream {rng.random()}", "max_tokens": rng.randint(1, 40), "ignore_eos": True}
    if rng.random() < 0.5:
        body["temperature"] = 0
    r = await stream_completion(client, url, body)
    if r["status"] == 503:
        REPORT.refused += 1
        REPORT.refusal_latency_s.append(r["head_s"])
        return "refused"
    REPORT.failed += not (r["done"] and r["error"] is None)
    assert r["status"] == 200 and r["done"] and r["error"] is None and r["finish_reason"] == "length", r
    return "ok"


def test_soak(cluster):
    rng = random.Random(7)
    kinds = [_stream] * 5 + [_chat] * 2 + [_hang_up, _bad]

    async def main():
        counts: dict[str, int] = {}
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=200)) as client:
            for _ in range(ROUNDS):
                n = rng.choice([8, 16, 48])          # 48 is past what the pools hold
                for outcome in await asyncio.gather(*[rng.choice(kinds)(client, cluster, rng) for _ in range(n)]):
                    counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    counts = asyncio.run(main())
    assert counts.get("ok", 0) > 0
    usage = wait_idle(cluster)
    assert usage and not any(usage.values()), usage
    REPORT.notes.append(f"soak ({ROUNDS} rounds): {counts}")
