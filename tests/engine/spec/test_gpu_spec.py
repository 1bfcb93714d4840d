"""On the device: P-EAGLE greedy output equals the target's own greedy output with CUDA
graphs (verification and drafting captured at K + 1 query tokens per request) on and
off, async scheduling on and off, and the graphs really replay."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine.spec.test_engine_spec import PROMPTS, _params, heads, target  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu


def _generate(folder, graphs: bool, async_: bool, head=None, k: int = 3):
    spec = None if head is None else {"method": "peagle", "model": str(head), "num_speculative_tokens": k}
    llm = LLM(str(folder), device="cuda", dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=8,
              enable_cuda_graphs=graphs, async_scheduling=async_, speculative_config=spec)
    launched = []
    if graphs:
        g = llm.engine.runner.graphs
        launch = g._launch
        g._launch = lambda size, seq_lens: launched.append(size) or launch(size, seq_lens)
    outs = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, _params())]
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"
    return llm, outs, launched


def test_spec_with_graphs_and_async_equals_greedy_without(target, heads):  # noqa: F811
    folder, _ = target
    _, base, _ = _generate(folder, graphs=False, async_=False)
    for graphs, async_ in ((False, False), (True, False), (False, True), (True, True)):
        llm, outs, launched = _generate(folder, graphs, async_, head=heads[1])
        assert outs == base, f"graphs={graphs} async={async_}"
        assert not graphs or launched, "no spec decode step replayed a graph"
        assert llm.engine.spec_stats.num_accepted_tokens > 0


def test_seeded_sampling_is_the_same_with_and_without_graphs(target, heads):  # noqa: F811
    folder, _ = target
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=5, ignore_eos=True)
    runs = []
    for graphs in (False, True):
        llm = LLM(str(folder), device="cuda", dtype="float32", block_size=4, enable_cuda_graphs=graphs,
                  speculative_config={"method": "peagle", "model": str(heads[1]), "num_speculative_tokens": 3})
        runs.append(llm.generate([PROMPTS[1], PROMPTS[3]], [sp, sp]))
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]


def test_logprobs_and_penalties_on_the_device(target, heads):  # noqa: F811
    """The eager spec steps that logprobs and penalties take, through the Triton kernels:
    the same tokens and logprobs (within 1e-3) as without speculation."""
    folder, _ = target
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.5,
                             frequency_penalty=1.0, repetition_penalty=1.3, logit_bias={7: 2.0})]
    outs = []
    for head in (None, heads[1]):
        spec = None if head is None else {"method": "peagle", "model": str(head), "num_speculative_tokens": 3}
        llm = LLM(str(folder), device="cuda", dtype="float32", block_size=4, speculative_config=spec)
        outs.append(llm.generate(PROMPTS[1:3], params))
    for plain, spec in zip(*outs):
        assert plain.outputs[0].token_ids == spec.outputs[0].token_ids
    for la, lb in zip(outs[0][0].outputs[0].logprobs, outs[1][0].outputs[0].logprobs):
        assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-3 for k in la)


@pytest.mark.parametrize("async_", [False, True])
def test_drafts_per_batch_with_graphs(target, heads, async_):  # noqa: F811
    """num_speculative_tokens_per_batch with captured graphs: a graph set per k, the
    smaller k's graphs replay once the batch crosses a threshold, greedy unchanged."""
    folder, _ = target
    _, base, _ = _generate(folder, graphs=False, async_=False)
    llm = LLM(str(folder), device="cuda", dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=8,
              enable_cuda_graphs=True, async_scheduling=async_,
              speculative_config={"method": "peagle", "model": str(heads[1]), "num_speculative_tokens": 3,
                                  "num_speculative_tokens_per_batch": [[3, 2], [5, 1]]})
    runner = llm.engine.runner
    assert sorted(runner.spec_graphs) == [1, 2, 3]
    launched = []
    for k, g in runner.spec_graphs.items():
        launch = g._launch
        g._launch = lambda size, seq_lens, k=k, launch=launch: launched.append(k) or launch(size, seq_lens)
    outs = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, _params())]
    assert outs == base
    assert {k for k in launched if k < 3}, f"no graph of a smaller k replayed: {launched}"
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
