"""Every family matches transformers token for token (greedy) and in logprobs."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine.tiny_models import CONFIGS, assert_logprobs_match, build, hf_greedy

NEW_TOKENS = 32
LOGPROB_ATOL = 2e-4   # float32, absolute, on log-softmax values
PROMPTS = [[5, 17, 99, 3], list(range(40, 77)), [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 250],
           [7] * 23]


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder)
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    return request.param, folder, refs


ENGINE_VARIANTS = {
    "chunked-bs16": dict(block_size=16, enable_chunked_prefill=True, max_num_batched_tokens=24),
    "unchunked-bs1": dict(block_size=1, enable_chunked_prefill=False, max_num_batched_tokens=256),
    "tiny-pool-preempt": dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=64, max_model_len=96),
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_tokens_and_logprobs_match_transformers(family, variant):
    name, folder, refs = family
    llm = LLM(str(folder), max_logprobs=256, **ENGINE_VARIANTS[variant])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=256)
    outs = llm.generate(PROMPTS, params)
    assert_logprobs_match(outs, refs, LOGPROB_ATOL, f"{name}/{variant}")
    assert all(out.finish_reason == "length" for out in outs)
    if variant == "tiny-pool-preempt":
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny pool should force preemption"
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"


def test_prefix_cache_hits_give_identical_tokens(family):
    name, folder, refs = family
    llm = LLM(str(folder), block_size=4, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    first = llm.generate(PROMPTS, params)
    second = llm.generate(PROMPTS, params)      # same prompts: full-block prefix hits
    pool = llm.engine.kv.paged.pool
    assert pool.hits > 0
    for a, b, (ref, _) in zip(first, second, refs):
        assert a.token_ids == ref and b.token_ids == ref
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
