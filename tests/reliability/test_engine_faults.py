"""Faults straight into the engine, without the HTTP layer in front of it.

A hypothesis fuzz of every sampling parameter: whatever the values, the request is
refused with ValueError before it changes anything, or it runs to the end; the engine
keeps serving and its block pool is full again. And a step that fails for a reason no
request explains: every request in flight gets an error (none hangs), the traceback is
logged, and the engine reports itself dead so its supervisor replaces it."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from engine.async_engine import AsyncEngine, EngineDead
from engine.config import EngineConfig
from engine.request import Request
from tests.reliability.conftest import REPORT

ints = st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70), st.sampled_from(
    [2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]), st.booleans())
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 3), st.integers(-2, 2),
                   st.booleans())
strings = st.text(st.characters(codec="utf-8"), max_size=300)
PARAMS = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(st.integers(1, 6), ints), "temperature": floats, "top_k": ints, "top_p": floats,
    "min_p": floats, "seed": st.one_of(st.none(), ints), "logprobs": st.one_of(st.none(), ints),
    "ignore_eos": st.one_of(st.booleans(), ints),
    "stop": st.one_of(strings, st.lists(strings, max_size=20), st.lists(ints, max_size=2)),
    "stop_token_ids": st.lists(ints, max_size=4)})
PROMPTS = st.lists(st.one_of(st.integers(0, 300), ints), min_size=0, max_size=12)


@pytest.fixture(scope="module")
def core(default_llm):
    return default_llm.engine


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(params=PARAMS, prompt=PROMPTS)
def test_fuzzed_sampling_parameters_never_break_the_engine(core, params, prompt):
    REPORT.sent += 1
    try:
        sp = SamplingParams(**params)
        core.add_request(Request("fuzz", prompt, sp))
    except ValueError:
        assert not core.has_unfinished()        # refused and nothing changed
        return
    for name in ("temperature", "top_p", "min_p"):
        assert math.isfinite(getattr(sp, name))
    steps = 0
    while core.has_unfinished():
        core.step()
        steps += 1
        assert steps < 400
    assert core.kv.usage == 0


def test_a_step_failure_fails_every_request_and_marks_the_engine_dead(caplog):
    """A fault injected into the runner (no request is to blame): each stream in flight
    raises EngineDead, new work is refused, the health check fails."""
    engine = AsyncEngine(EngineConfig(max_model_len=128, max_num_seqs=4), max_waiting=4)
    sp = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        async def consume(i):
            got = 0
            try:
                async for d in engine.generate([1, 2, 3, i], sp, f"r{i}"):
                    got += len(d.new_token_ids)
                    if i == 0 and got == 5:
                        engine.core.runner.execute = _broken     # the next step fails
            except EngineDead as e:
                return got, e
            return got, None
        return await asyncio.wait_for(asyncio.gather(*[consume(i) for i in range(4)]), timeout=60)

    try:
        with caplog.at_level(logging.ERROR, logger="engine.async_engine"):
            results = asyncio.run(main())
        assert all(isinstance(e, EngineDead) for _, e in results), results
        assert all(got < 60 for got, _ in results)
        assert "engine step failed" in caplog.text and "injected fault" in caplog.text
        with pytest.raises(EngineDead):
            engine.check_health()

        async def again():
            async for _ in engine.generate([1, 2], sp, "late"):
                pass
        with pytest.raises(EngineDead):
            asyncio.run(again())
    finally:
        engine.shutdown()


def _broken(*_args, **_kw):
    raise RuntimeError("injected fault")


def test_a_request_failing_to_deliver_fails_alone(default_llm):
    """An error attributable to one request (here its detokenizer) ends that request
    with an error and the others finish normally."""
    engine = AsyncEngine(EngineConfig(max_model_len=128, max_num_seqs=4), max_waiting=4)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = default_llm.generate([[5, 6, 7]], sp)[0].token_ids

    async def main():
        async def consume(rid, ids):
            out = []
            async for d in engine.generate(ids, sp, rid):
                if rid == "bad":
                    engine._streams["bad"].detok.add = _broken
                out += d.new_token_ids
            return out
        return await asyncio.gather(consume("bad", [9, 9, 9]), consume("good", [5, 6, 7]), return_exceptions=True)

    try:
        bad, good = asyncio.run(main())
        assert "injected fault" in repr(bad) and good == ref
        engine.check_health()
        assert engine.core.kv.usage == 0
    finally:
        engine.shutdown()


def test_an_error_after_the_stream_started_is_an_error_event():
    """The served API over an engine whose step fails mid-stream: the client gets its
    chunks, then an error event in OpenAI's shape and [DONE], never a silent cut."""
    import json

    import httpx

    from cluster.metrics import Metrics
    from cluster.openai_api import build_api
    from tests.cluster.conftest import Served

    engine = AsyncEngine(EngineConfig(max_model_len=128, max_num_seqs=4), max_waiting=4)
    served = Served(build_api(engine, "m", Metrics("m", "colocated")))
    events = []
    try:
        with httpx.stream("POST", f"{served.url}/v1/completions", timeout=60, json={
                "model": "m", "prompt": [1, 2, 3], "max_tokens": 60, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        engine.core.runner.execute = _broken
        REPORT.sent += 1
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "injected fault" in error["message"]
        assert all("choices" in json.loads(e) for e in events[:-2])
        assert httpx.get(f"{served.url}/health").status_code == 503
    finally:
        served.stop()
        engine.shutdown()


def test_a_failed_local_recompute_is_counted_apart():
    """pd: the prefill pool fails, and then so does the local recompute: the transfer
    failure is counted, and the recompute as failed, not as recomputed."""
    from cluster.kv_transfer_metrics import KVTransferMetrics
    from cluster.metrics import Metrics
    from disagg.prefill_decode import PrefillDecodeEngine

    async def dead_prefill(_request):
        raise ConnectionError("prefill replica gone")

    metrics = Metrics("m", "decode")
    decode = AsyncEngine(EngineConfig(max_model_len=128, max_num_seqs=4), max_waiting=4)
    pd = PrefillDecodeEngine(decode, dead_prefill, KVTransferMetrics(metrics, "recompute"))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def run(rid):
        return [d async for d in pd.generate([1, 2, 3], sp, rid)]

    def value(name):
        return sum(s.value for f in metrics.registry.collect() for s in f.samples if s.name == name)
    try:
        assert len(asyncio.run(run("ok"))) >= 1
        assert value("tandem_kv_transfer_recomputed_total") == 1
        decode.core.runner.execute = _broken
        with pytest.raises(EngineDead):
            asyncio.run(run("fails"))
        assert value("tandem_kv_transfer_failures_total") == 2
        assert value("tandem_kv_transfer_recomputed_total") == 1
        assert value("tandem_kv_transfer_recompute_failures_total") == 1
    finally:
        decode.shutdown()


@pytest.mark.parametrize("params", [
    dict(temperature=0),
    dict(temperature=0.9, seed=11),
    dict(temperature=0.9, seed=5, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3),
], ids=["greedy", "seeded", "penalised"])
def test_a_resumed_request_continues_exactly(params):
    """What a router sends when a stream's engine was lost: the same prompt with the
    tokens so far as output. The continuation equals the uninterrupted run's tokens,
    penalties included (they count the earlier tokens as output, not prompt)."""
    engine = AsyncEngine(EngineConfig(max_model_len=128, max_num_seqs=4), max_waiting=4)
    sp = SamplingParams(max_tokens=30, ignore_eos=True, **params)

    async def run(rid, prefix=None):
        return [t async for d in engine.generate([7, 8, 9, 10], sp, rid, output_prefix=prefix)
                for t in d.new_token_ids]
    try:
        whole = asyncio.run(run("whole"))
        for cut in (1, 13, 29):
            assert asyncio.run(run(f"resumed-{cut}", whole[:cut])) == whole[cut:]
        assert engine.core.kv.usage == 0
    finally:
        engine.shutdown()
