"""On the device: CUDA graphs on/off and sync/async scheduling give the same tokens
(float32 tiny models: token-exact, logprobs within 1e-4), and graphs really replay."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine.test_async_and_graphs import PROMPTS, _assert_same, _params
from tests.engine.tiny_models import build

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v2", "llama"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build(request.param, path)
    return path


def _run(folder, graphs: bool, async_: bool, **kw):
    llm = LLM(str(folder), device="cuda", dtype="float32", block_size=4, max_num_batched_tokens=16,
              max_num_seqs=8, enable_cuda_graphs=graphs, async_scheduling=async_, **kw)
    launched = []
    if graphs:
        g = llm.engine.runner.graphs
        launch = g._launch
        g._launch = lambda size, seq_lens: launched.append(size) or launch(size, seq_lens)
    outs = llm.generate(PROMPTS, _params())
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    return outs, launched


def test_graphs_and_async_change_no_token(folder):
    ref, _ = _run(folder, graphs=False, async_=False)
    for graphs, async_ in ((True, True), (True, False), (False, True)):
        outs, launched = _run(folder, graphs, async_)
        _assert_same(ref, outs)
        assert not graphs or launched, "no decode step replayed a graph"


def test_defaults_on_cuda_are_graphs_and_async(folder):
    llm = LLM(str(folder), device="cuda", dtype="float32", max_num_seqs=4)
    assert llm.config.enable_cuda_graphs and llm.config.async_scheduling
    assert sorted(llm.engine.runner.graphs.graphs) == [1, 2, 4]
    outs = llm.generate(PROMPTS[:3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    ref = LLM(str(folder), device="cuda", dtype="float32", max_num_seqs=4, cuda_graphs=False,
              async_scheduling=False).generate(PROMPTS[:3], SamplingParams(max_tokens=6, temperature=0.0,
                                                                            ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
