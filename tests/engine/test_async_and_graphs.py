"""Async scheduling, padded decode steps (the CUDA-graph path) and batch composition
change no token: CPU checks of what the device runs (the device repeats them with
real graphs in test_gpu_runner.py)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.runner.cuda_graphs import bucket_for, graph_batch_sizes, pad_step_inputs
from tests.engine.tiny_models import build

PROMPTS = [[5, 17, 99, 3], list(range(40, 61)), [7] * 9, list(range(100, 113)), [1, 2]]


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v2", "llama"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build(request.param, path)
    return path


def _params() -> list[SamplingParams]:
    """Different lengths (requests finish at different steps while others go on), a
    seeded random sampler with filters, and logprobs."""
    return [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True, logprobs=2),
            SamplingParams(max_tokens=7, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=0)]


def _run(folder, prompts=PROMPTS, params=None, **engine_args):
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=engine_args.pop("budget", 16), **engine_args)
    outs = llm.generate(prompts, params or _params())
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"
    assert not llm.engine.scheduler.pending, "placeholders left behind"
    return llm, outs


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].finish_reason == y.outputs[0].finish_reason
        if x.outputs[0].logprobs is not None:
            for la, lb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                assert la.keys() == lb.keys()
                assert all(abs(la[k] - lb[k]) < 1e-4 for k in la)


def test_async_scheduling_gives_the_sync_tokens(folder):
    _, sync = _run(folder, async_scheduling=False)
    llm, asyn = _run(folder, async_scheduling=True)
    assert llm.engine.config.async_scheduling
    _assert_same(sync, asyn)
    assert [len(o.outputs[0].token_ids) for o in asyn] == [p.max_tokens for p in _params()]


def test_stop_token_seen_one_step_late_is_discarded(folder):
    """The stop token of a request arrives while its next step is already running: that
    step's token must not reach the output."""
    _, free = _run(folder, async_scheduling=False)
    stop_at = free[1].outputs[0].token_ids[4]
    params = _params()
    params[1] = SamplingParams(max_tokens=11, temperature=0.0, stop_token_ids=[stop_at], logprobs=2)
    _, sync = _run(folder, params=params, async_scheduling=False)
    _, asyn = _run(folder, params=params, async_scheduling=True)
    _assert_same(sync, asyn)
    ids = asyn[1].outputs[0].token_ids
    assert ids[-1] == stop_at and stop_at not in ids[:-1] and asyn[1].outputs[0].finish_reason == "stop"


def test_async_with_preemption_gives_the_same_tokens(folder):
    _, ref = _run(folder, async_scheduling=False)
    llm, asyn = _run(folder, async_scheduling=True, num_kv_blocks=14, max_model_len=48)
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_same(ref, asyn)


def test_batch_composition_changes_no_token(folder):
    _, together = _run(folder, async_scheduling=True)
    for i, (prompt, sp) in enumerate(zip(PROMPTS, _params())):
        _, alone = _run(folder, prompts=[prompt], params=[sp], async_scheduling=True)
        assert alone[0].outputs[0].token_ids == together[i].outputs[0].token_ids


def test_padded_decode_steps_give_the_eager_tokens(folder):
    """The graph path's padding run eagerly: decode batches of 1-5 padded to 2/4/8,
    pad entries on the table's pad row."""
    ref_llm, ref = _run(folder, async_scheduling=True)
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=16, async_scheduling=True)
    runner = llm.engine.runner
    runner.capture_cuda_graphs(sizes=[2, 4, 8], eager=True)
    launched = []
    launch = runner.graphs._launch
    runner.graphs._launch = lambda size, seq_lens: launched.append(size) or launch(size, seq_lens)
    outs = llm.generate(PROMPTS, _params())
    _assert_same(ref, outs)
    assert set(launched) >= {2, 4}      # batches of 1 and 3 ran padded
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    # Padded entries route to experts too, but never count as expert load.
    for m, m_ref in zip(llm.engine.model.moe_layers(), ref_llm.engine.model.moe_layers()):
        assert torch.equal(m.expert_load, m_ref.expert_load)
    pad = runner.table.pad_row
    assert int(runner.table.num_computed[pad]) == 0 and int(runner.table.num_tokens[pad]) == 0


def test_graph_sizes_and_padding():
    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(100)[-1] == 100 and all(s <= 100 for s in graph_batch_sizes(100))
    assert bucket_for([1, 2, 4], 3) == 4 and bucket_for([1, 2, 4], 5) is None
    import numpy as np
    host = pad_step_inputs(np.array([5, 2]), np.array([True, False]), 4, pad_row=9)
    assert host.tolist() == [[5, 2, 9, 9], [1, 1, 0, 0], [1, 0, 0, 0]]


def test_switches_default_by_device_and_refuse_graphs_on_cpu():
    c = EngineConfig()
    assert c.enable_cuda_graphs is False and c.async_scheduling is False
    with pytest.raises(ValueError, match="enable_cuda_graphs needs device='cuda'"):
        EngineConfig(enable_cuda_graphs=True)
    with pytest.raises(ValueError, match="enable_cuda_graphs"):
        LLM("default", cuda_graphs=True)
    assert LLM("default", cuda_graphs=False).config.enable_cuda_graphs is False
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            LLM("default").engine.runner.capture_cuda_graphs()


def test_streaming_engine_with_async_scheduling_streams_the_same_tokens():
    """AsyncEngine's loop thread with one step in flight: every token arrives, in order,
    the same as offline sync generation."""
    import asyncio

    from engine.async_engine import AsyncEngine

    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM("default").generate(["the first", "a second prompt"], sp)
    eng = AsyncEngine(EngineConfig(model="default", async_scheduling=True))

    async def one(prompt, rid):
        ids = []
        async for delta in eng.generate(prompt, sp, rid):
            ids.extend(delta.new_token_ids)
        return ids

    async def both():
        return await asyncio.gather(one("the first", "r1"), one("a second prompt", "r2"))

    try:
        got = asyncio.run(both())
    finally:
        eng.shutdown()
    assert got == [o.outputs[0].token_ids for o in expected]
