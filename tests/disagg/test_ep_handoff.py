"""KV hand-off into (and out of) expert-parallel engines over real NIXL: each rank runs
its own connector. A PrefillDecodeEngine whose decode engine is a 2-rank EPEngine gives
the same greedy tokens as one single-process engine, on a tiny Qwen3-MoE (prefill on a
single-process engine) and on the embedded DeepSeek-V3-shaped default (prefill on a
2-rank EPEngine too, whose handles name each rank's own agent); no block leaks on
either side; a failed transfer is recomputed on its rank, counted by the coordinator's
observer, with the same tokens (under the fail policy it fails that request alone)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from disagg.connector import connector_spec
from disagg.prefill_decode import PrefillDecodeEngine, prefill_request
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.distributed import EPEngine
from engine.engine_client import ParallelConfig
from engine.kv_transfer import KVTransferFailed
from engine.kv_transfer_params import KVTransferParams
from engine.sampling_params import SamplingParams
from tests.engine.tiny_models import build

PROMPTS = [[(7 * i + 3) % 200 + 20 for i in range(n)] for n in (5, 17, 40)]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
EP2 = ParallelConfig(data_parallel_size=2, enable_expert_parallel=True)


class Observer:
    """Counts what the decode side's connectors report, as the replica's metrics would."""

    def __init__(self) -> None:
        self.bytes = self.transfers = 0
        self.failures: Counter = Counter()

    def transferred(self, nbytes: int, seconds: float, descriptors: int) -> None:
        self.bytes += nbytes
        self.transfers += 1

    def failed(self, reason: str) -> None:
        self.failures[reason] += 1

    def prefill_failed(self, recomputed: bool) -> None:
        self.failures["prefill"] += 1


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("qwen3_moe")
    build("qwen3_moe", folder)
    return str(folder)


@pytest.fixture(scope="module", params=[("qwen3_moe", None), ("default", EP2)], ids=["qwen3_moe", "default-ep-prefill"])
def setup(request) -> tuple[str, ParallelConfig | None]:
    family, prefill_parallel = request.param
    return request.getfixturevalue(family) if family != "default" else family, prefill_parallel


async def tokens(front, prompt: list[int], rid: str) -> list[int]:
    out = []
    async for delta in front.generate(prompt, PARAMS, rid):
        out += delta.new_token_ids
    return out


def pools_full(engine: AsyncEngine, timeout_s: float = 20) -> bool:
    """Every block free and none held for a reader, on every rank (the engine loop keeps
    stepping while some are held, so their release shows in the ranks' stats)."""
    client = engine.core
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if isinstance(client, EPEngine):
            if not client.has_pending_work and client.engine_stats().kv_cache_usage == 0.0:
                return True
        elif not client.scheduler.held and client.kv.num_free_blocks == client.num_blocks:
            return True
        time.sleep(0.05)
    return False


def test_pd_into_two_ep_ranks_equals_one_engine(setup):
    model, prefill_parallel = setup
    config = EngineConfig(model=model, max_model_len=256, max_num_seqs=4)

    async def run():
        single = AsyncEngine(config)
        want = [await tokens(single, p, f"ref-{i}") for i, p in enumerate(PROMPTS)]
        single.shutdown()

        prefill = AsyncEngine(config, kv_transfer=connector_spec(), parallel=prefill_parallel)
        observer = Observer()
        decode = AsyncEngine(config, kv_transfer=connector_spec(host="127.0.0.1"), kv_observer=observer, parallel=EP2)
        corrupt = {"on": False}
        producers = set()

        async def call_prefill(request: dict) -> dict:
            answer = await prefill_request(prefill, request)
            handle = (answer.get("kv_transfer_params") or {}).get("handle")
            producers.add(handle["engine_id"])
            if corrupt["on"]:
                handle["layout_hash"] = "0" * 16      # the READ is refused: recompute on the rank
            return answer

        pd = PrefillDecodeEngine(decode, call_prefill, observer)
        try:
            got = await asyncio.gather(*(tokens(pd, p, f"pd-{i}") for i, p in enumerate(PROMPTS)))
            assert got == want
            assert observer.transfers == len(PROMPTS) and observer.bytes > 0 and not observer.failures
            # A 2-rank prefill engine spread the three prompts over both ranks' agents.
            assert len(producers) == (2 if prefill_parallel else 1)

            corrupt["on"] = True
            assert await tokens(pd, PROMPTS[1], "bad") == want[1]
            assert observer.failures == Counter(layout=1) and observer.transfers == len(PROMPTS)

            # No leak: the prefill side freed every held block once read (or refused),
            # and every decode rank's pool is full again.
            assert pools_full(prefill) and pools_full(decode)
        finally:
            for e in (prefill, decode):
                e.shutdown()
    asyncio.run(run())


def test_under_the_fail_policy_a_failed_load_fails_that_request_alone(qwen3_moe):
    config = EngineConfig(model=qwen3_moe, max_model_len=256, max_num_seqs=4, kv_load_failure_policy="fail")

    async def run():
        prefill = AsyncEngine(config, kv_transfer=connector_spec())
        observer = Observer()
        decode = AsyncEngine(config, kv_transfer=connector_spec(), kv_observer=observer, parallel=EP2)

        async def call_prefill(request: dict) -> dict:
            answer = await prefill_request(prefill, request)
            if request["request_id"] == "bad":
                answer["kv_transfer_params"]["handle"]["layout_hash"] = "0" * 16
            return answer

        pd = PrefillDecodeEngine(decode, call_prefill, observer)
        try:
            with pytest.raises(KVTransferFailed, match="layout"):
                await tokens(pd, PROMPTS[1], "bad")
            assert observer.failures == Counter(layout=1)
            # A malformed hand-off is refused before it reaches a rank, as one engine refuses it.
            bad_first = KVTransferParams(do_remote_prefill=True, handle={}, first_token_ids=[10**6])
            with pytest.raises(ValueError, match="first_token_ids"):
                async for _ in decode.generate(PROMPTS[0], PARAMS, "bad-first", bad_first):
                    pass
            assert len(await tokens(pd, PROMPTS[1], "good")) == PARAMS.max_tokens     # the engine goes on
            assert observer.transfers == 1
            assert pools_full(prefill) and pools_full(decode)
        finally:
            for e in (prefill, decode):
                e.shutdown()
    asyncio.run(run())


def test_ranks_that_join_run_their_own_connector_and_leaving_ranks_wait_for_their_readers(qwen3_moe):
    """Elastic EP on both sides (EPLB's scale_to): a decode rank that joins later gets the
    connector in its init message and takes hand-offs; a prefill rank that leaves while
    it holds a prefill's KV is retired only once the reader has it (no recompute)."""
    from eplb.elastic import ElasticEPEngine

    config = EngineConfig(model=qwen3_moe, max_model_len=256, max_num_seqs=4)

    async def run():
        single = AsyncEngine(config)
        want = [await tokens(single, p, f"ref-{i}") for i, p in enumerate(PROMPTS)]
        single.shutdown()
        observer = Observer()
        # 8 experts + 4 redundant slots: 4 slots per rank, so 3 prefill ranks can shrink to 2.
        prefill = AsyncEngine(engine_client=ElasticEPEngine(config, 3, num_redundant_experts=4),
                              kv_transfer=connector_spec())
        decode = AsyncEngine(engine_client=ElasticEPEngine(config, 1), kv_transfer=connector_spec(),
                             kv_observer=observer)
        shrinking = []

        async def prefill_then_shrink(request: dict) -> dict:
            answer = await prefill_request(prefill, request)
            if not shrinking:       # the handle names the last rank, which leaves now
                shrinking.append(asyncio.ensure_future(prefill.run_in_loop(lambda c: c.scale_to(2))))
            return answer

        def only_the_last_rank(c):
            c.accepting = {c.ranks[-1].name}

        def every_rank(c):
            c.accepting = {r.name for r in c.ranks}
        pd = PrefillDecodeEngine(decode, prefill_then_shrink, observer)
        try:
            await decode.run_in_loop(lambda c: c.scale_to(2))
            await decode.run_in_loop(only_the_last_rank)
            await prefill.run_in_loop(only_the_last_rank)
            assert await tokens(pd, PROMPTS[1], "while-shrinking") == want[1]
            await shrinking[0]
            await prefill.run_in_loop(every_rank)
            assert prefill.core.world_size == decode.core.world_size == 2
            assert observer.transfers == 1 and not observer.failures
            assert await asyncio.gather(*(tokens(pd, p, f"pd-{i}") for i, p in enumerate(PROMPTS))) == want
            assert observer.transfers == 1 + len(PROMPTS) and not observer.failures
            assert pools_full(prefill) and pools_full(decode)
        finally:
            for e in (prefill, decode):
                e.shutdown()
    asyncio.run(run())
