"""Replicas killed under steady load: no request is lost or silently cut.

A decode replica killed mid-stream is invisible to its clients: the router resumes each
stream on the other decode replica with the prompt plus the tokens already sent, and the
text is exactly what an undisturbed run gives. A prefill replica killed mid-run costs a
local prefill on the decode side, counted by the transfer-failure metrics."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
import ray

from tests.reliability.conftest import REPORT, complete, replica_gauges, stream_completion, wait_ready


def serve_replicas(deployment: str, want: int | None = None, timeout: float = 120.0) -> list[str]:
    """The suite app's live replicas of `deployment`; with `want`, waits until Serve has
    that many (a replica replaced earlier may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith(f"SERVE_REPLICA::tandem#{deployment}#"))
        if want is None or len(names) == want or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


def kill(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def counter(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def load_with_kill(url: str, bodies: list[dict], pick_victim, after_chunks: int) -> list[dict]:
    """Stream every body at once; once `after_chunks` chunks have arrived in total, kill
    the replica `pick_victim()` names."""
    seen = {"chunks": 0}

    async def one(client, body):
        r = await stream_completion(client, url, body)
        return r

    async def killer():
        while seen["chunks"] < after_chunks:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(lambda: kill(pick_victim()))

    async with httpx.AsyncClient(timeout=300) as client:
        original = client.stream

        def counting_stream(*a, **kw):       # count chunks as they arrive
            cm = original(*a, **kw)

            class Wrapped:
                async def __aenter__(self):
                    r = await cm.__aenter__()
                    lines = r.aiter_lines

                    async def counted():
                        async for line in lines():
                            if line.startswith("data: {"):
                                seen["chunks"] += 1
                            yield line
                    r.aiter_lines = counted
                    return r

                async def __aexit__(self, *exc):
                    return await cm.__aexit__(*exc)
            return Wrapped()
        client.stream = counting_stream
        kill_task = asyncio.create_task(killer())
        results = await asyncio.gather(*[one(client, b) for b in bodies])
        await kill_task
        return results


KILL_ROUNDS = int(os.environ.get("TANDEM_KILL_ROUNDS", "1"))


@pytest.mark.parametrize("round_", range(KILL_ROUNDS))
def test_decode_replica_killed_mid_stream_is_invisible(cluster, round_):
    greedy = [{"prompt": f"resume me {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True} for i in range(4)]
    seeded = [{"prompt": f"seeded {i}", "max_tokens": 40, "temperature": 0.9, "seed": 100 + i, "ignore_eos": True}
              for i in range(3)]
    seeded.append({"prompt": "penalised", "max_tokens": 40, "temperature": 0.9, "seed": 7, "ignore_eos": True,
                   "frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3})
    refs = [complete(cluster, **b).json()["choices"][0]["text"] for b in greedy + seeded]
    resumed_before = counter(cluster, "tandem_requests_resumed_total")
    decode = serve_replicas("Decode", want=2)
    assert len(decode) == 2
    victim = []

    def busiest() -> str:
        """The decode replica running the most of this load (a replica just started by
        Serve may hold none of it)."""
        running = {rid: n for (pool, rid), n in replica_gauges(cluster, "tandem_num_requests_running").items()
                   if pool == "decode"}
        victim.append(max(decode, key=lambda name: running.get(name.rsplit("#", 1)[1], 0)))
        return victim[0]

    unseeded = [{"prompt": f"free {i}", "max_tokens": 40, "ignore_eos": True} for i in range(4)]
    results = asyncio.run(load_with_kill(cluster, greedy + seeded + unseeded, busiest, after_chunks=60))
    for r, ref in zip(results, refs + [None] * 4):
        if r["status"] == 503 and not r["chunks"]:   # refused at admission (a replica still starting)
            REPORT.refused += 1
            continue
        REPORT.failed += not (r["done"] and r["error"] is None)
        assert r["status"] == 200 and r["done"] and r["error"] is None and r["finish_reason"] == "length", r
        assert ref is None or r["text"] == ref
    assert sum(r["status"] == 200 for r in results) >= 8
    resumed = counter(cluster, "tandem_requests_resumed_total") - resumed_before
    REPORT.resumed += int(resumed)
    assert resumed >= 1
    wait_ready(cluster)     # Serve has replaced the replica
    assert len(serve_replicas("Decode", want=2)) == 2 and victim[0] not in serve_replicas("Decode")


@pytest.mark.parametrize("round_", range(KILL_ROUNDS))
def test_prefill_replica_killed_mid_run_costs_a_local_prefill(cluster, round_):
    bodies = [{"prompt": f"prefill gone {i} " * 8, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
              for i in range(12)]
    refs = [complete(cluster, **b).json()["choices"][0]["text"] for b in bodies[:4]]
    failures_before = counter(cluster, "tandem_kv_transfer_failures_total")
    prefill = serve_replicas("Prefill")
    t0 = time.perf_counter()

    async def staggered():
        async def later(client, i, body):
            await asyncio.sleep(0.1 * i)         # requests keep arriving around the kill
            return await stream_completion(client, cluster, body)

        async def killer():
            await asyncio.sleep(0.3)
            await asyncio.to_thread(kill, prefill[0])
        async with httpx.AsyncClient(timeout=300) as client:
            k = asyncio.create_task(killer())
            out = await asyncio.gather(*[later(client, i, b) for i, b in enumerate(bodies)])
            await k
            return out

    results = asyncio.run(staggered())
    wall = time.perf_counter() - t0
    for r in results:
        REPORT.failed += not (r["done"] and r["error"] is None)
        assert r["status"] == 200 and r["done"] and r["error"] is None, r
    assert [r["text"] for r in results[:4]] == refs
    assert counter(cluster, "tandem_kv_transfer_failures_total") > failures_before
    slowest = max(r["e2e_s"] for r in results)
    # The prefill call has a deadline (3 s here): no request waits for Serve to bring the
    # replica back (it once stalled ~12 s).
    assert slowest < 12.0, slowest
    REPORT.notes.append(f"prefill replica killed: {len(bodies)} requests over {wall:.1f} s all completed, "
                        f"slowest {slowest:.1f} s end to end")
    wait_ready(cluster)
    assert prefill[0] not in serve_replicas("Prefill") and len(replica_gauges(cluster, "tandem_kv_cache_usage_perc")) >= 3
