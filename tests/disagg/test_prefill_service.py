"""Prefill in another process behind a PrefillService (ZeroMQ, msgpack), decode here:
answers equal one engine's; a dead prefill process is recomputed around."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest

from disagg.connector import connector_spec
from disagg.prefill_decode import PrefillDecodeEngine
from disagg.prefill_service import PrefillClient
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from tests.disagg.prefill_process import serve_prefill_service

PROMPTS = ["one", "a prompt that runs past the first block of tokens", "z" * 32]


async def collect(front, prompt: str, rid: str, n: int = 8) -> tuple[str, list[int]]:
    last = None
    async for delta in front.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0), rid):
        last = delta
    return last.output.text, last.output.token_ids


@pytest.fixture(scope="module")
def prefill_process():
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=serve_prefill_service, args=(child,), daemon=True)
    proc.start()
    assert conn.poll(120), "the prefill service did not start"
    yield proc, conn.recv()
    if proc.is_alive():
        proc.kill()


def test_prefill_service_in_another_process(prefill_process):
    proc, address = prefill_process

    async def run():
        config = EngineConfig(max_model_len=256, max_num_seqs=4)
        colocated = AsyncEngine(config)
        decode = AsyncEngine(config, kv_transfer=connector_spec())
        client = PrefillClient(address, timeout_s=30)
        pd = PrefillDecodeEngine(decode, client)
        try:
            for i, prompt in enumerate(PROMPTS):
                assert await collect(pd, prompt, f"pd-{i}") == await collect(colocated, prompt, f"co-{i}")
            assert decode.kv_transfer.stats.transfers_total == len(PROMPTS)
            # Several at once over the one socket.
            many = await asyncio.gather(*(collect(pd, p, f"many-{i}") for i, p in enumerate(PROMPTS)))
            assert many == [await collect(colocated, p, f"co2-{i}") for i, p in enumerate(PROMPTS)]
            # The prefill process dies: the client times out and the decode engine
            # computes the prompt itself.
            proc.kill()
            proc.join(10)
            client.timeout_s = 1.0
            assert await collect(pd, PROMPTS[1], "after") == await collect(colocated, PROMPTS[1], "co-after")
            assert pd.num_local_prefills == 1
            core = decode.core
            assert core.kv.num_free_blocks == core.num_blocks and not core.scheduler.loading
        finally:
            client.close()
            for e in (colocated, decode):
                e.shutdown()
    asyncio.run(run())
