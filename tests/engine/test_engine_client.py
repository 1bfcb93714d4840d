"""One engine-client interface: LLM and AsyncEngine drive a single-process EngineCore and
a 2-rank expert-parallel EPEngine (gloo, one process per rank) the same way, and get
the same greedy tokens and text from both; with EPLB on, through live rebalances."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.core.engine_core import EngineCore
from engine.distributed import EPEngine
from engine.engine_client import EngineClient, ParallelConfig

PROMPTS = ["the first prompt", "a second, somewhat longer prompt than the first", "3"]
PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2)
ARGS = {"max_model_len": 256, "max_num_seqs": 8, "max_logprobs": 2}


@pytest.fixture(scope="module")
def one_process():
    return LLM("default", **ARGS)


@pytest.fixture(scope="module")
def reference(one_process):
    """One process, the offline API as it was."""
    return one_process.generate(PROMPTS, PARAMS)


def assert_same(outs, refs) -> None:
    for out, ref in zip(outs, refs):
        got, want = out.outputs[0], ref.outputs[0]
        assert got.token_ids == want.token_ids, ref.prompt
        assert got.text == want.text and got.finish_reason == want.finish_reason == "length"
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < 1e-4


async def stream_all(eng: AsyncEngine, prompts, params) -> list[tuple[list[int], str, str]]:
    """Per prompt: the streamed token ids, the final text and finish reason."""
    async def one(prompt, rid):
        ids = []
        async for delta in eng.generate(prompt, params, rid):
            ids.extend(delta.new_token_ids)
        return ids, delta.output.outputs[0].text, delta.output.outputs[0].finish_reason
    return await asyncio.gather(*(one(p, f"r{i}") for i, p in enumerate(prompts)))


def test_async_engine_over_a_given_core_client(reference):
    llm = LLM("default", **ARGS)
    assert isinstance(llm.engine, EngineCore) and isinstance(llm.engine, EngineClient)
    eng = AsyncEngine(engine_client=llm.engine)
    try:
        got = asyncio.run(stream_all(eng, PROMPTS, PARAMS))
        assert eng.engine_stats().num_running == 0 and eng.stats()["kv_cache_usage_perc"] >= 0.0
    finally:
        eng.shutdown()
    assert got == streamed(reference)


def streamed(outs) -> list[tuple[list[int], str, str]]:
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_llm_and_async_engine_over_two_ep_ranks_equal_one_process(one_process, reference):
    stop_params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True,
                                 stop=[reference[1].outputs[0].text[4:7]])
    stop_ref = one_process.generate(PROMPTS[1:2], stop_params)
    assert stop_ref[0].outputs[0].finish_reason == "stop"
    with LLM("default", data_parallel_size=2, enable_expert_parallel=True, **ARGS) as llm:
        assert isinstance(llm.engine, EPEngine) and isinstance(llm.engine, EngineClient)
        assert llm.engine.world_size == 2
        assert_same(llm.generate(PROMPTS, PARAMS), reference)
        # Bad input is refused at once, as one process refuses it, and the engine goes on.
        with pytest.raises(ValueError, match=r"prompt 1: .*token ids must be integers in"):
            llm.generate([[1, 2], [10**6]], PARAMS)
        assert not llm.engine.has_unfinished()

        # AsyncEngine takes over the same running client (its shutdown stops it); a stop
        # string ends a request on the front end and aborts it on its rank.
        eng = AsyncEngine(engine_client=llm.engine, max_waiting=4)
        try:
            got = asyncio.run(stream_all(eng, PROMPTS, PARAMS))
            stopped = asyncio.run(stream_all(eng, PROMPTS[1:2], stop_params))
            deadline = time.monotonic() + 30     # the abort reaches the rank with the loop's next step
            while eng.engine_stats().num_running and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = eng.engine_stats()
        finally:
            eng.shutdown()
        assert got == streamed(reference)
        assert stopped == streamed(stop_ref)
        assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
        assert not llm.engine.requests, "finished client requests are forgotten"


def test_llm_with_eplb_rebalances_and_keeps_the_tokens(reference):
    import eplb  # noqa: F401  (registers the EPLB engine client)

    eplb_config = {"step_interval": 2, "window_size": 4, "min_gain": 0.0}
    with LLM("default", data_parallel_size=2, enable_expert_parallel=True, enable_eplb=True,
             eplb_config=eplb_config, **ARGS) as llm:
        assert_same(llm.generate(PROMPTS, PARAMS), reference)
        assert llm.engine.stats.num_rebalances >= 1 and llm.engine.stats.bytes_moved_total > 0


def test_parallel_settings_that_cannot_work_say_what_to_change():
    with pytest.raises(ValueError, match="needs enable_expert_parallel"):
        ParallelConfig(data_parallel_size=2)
    with pytest.raises(ValueError, match="enable_eplb needs enable_expert_parallel"):
        LLM("default", enable_eplb=True)
    with pytest.raises(TypeError, match="unknown engine arguments: data_parallel"):
        LLM("default", data_parallel=2)
