"""The whole engine with every kernel on: same greedy tokens as transformers."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.kernels import kernel_backend
from tests.engine.kernels.cases import interpreted
from tests.engine.tiny_models import build, hf_greedy

PROMPTS = [[5, 17, 99, 3], list(range(40, 61))]


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v2"])
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder)
    return folder, hf


def _generate(folder, n_tokens: int, **engine_args):
    # Chunked prefill (8-token budget) and small blocks: context, prefill and decode paths.
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=8, **engine_args)
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, logprobs=3)
    return llm.generate(PROMPTS, params)


def _assert_matches_hf(outs, hf, n_tokens: int) -> None:
    """transformers' greedy tokens, each with its log-probability within 1e-4."""
    for out, prompt in zip(outs, PROMPTS):
        ref_tokens, ref_lp = hf_greedy(hf, prompt, n_tokens)
        assert out.token_ids == ref_tokens
        for step, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(lps[tok] - ref_lp[step, tok].item()) < 1e-4


@interpreted
def test_interpreted_kernels_match_transformers(family, monkeypatch):
    folder, hf = family
    n = 4
    from engine.kernels import attention

    def separate_store(*args, **kwargs):
        raise AssertionError("the rotary kernel stores K/V: no separate cache-store launch")
    monkeypatch.setattr(attention, "write_kv_triton", separate_store)
    with kernel_backend("triton"):
        outs = _generate(folder, n)
    _assert_matches_hf(outs, hf, n)


@interpreted
def test_interpreted_padded_async_steps_match_transformers(family):
    """The CUDA-graph decode path (padded batch, pad row, prepare kernel's padding
    program) run eagerly through the interpreter, with async scheduling."""
    folder, hf = family
    n = 4
    with kernel_backend("triton"):
        llm = LLM(str(folder), block_size=4, max_num_batched_tokens=8, async_scheduling=True)
        llm.engine.runner.capture_cuda_graphs(sizes=[4], eager=True)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3))
    _assert_matches_hf(outs, hf, n)


@interpreted
def test_interpreted_mla_expanded_prefill_matches_transformers(family, monkeypatch):
    """MLA with every request of 2+ query tokens in the expanded form: chunks over cached
    context in steps that also decode (both forms in one step), then prefix-cache hits."""
    from engine.layers import mla
    folder, hf = family
    if "deepseek" not in folder.name:
        pytest.skip("MLA only")
    monkeypatch.setattr(mla, "EXPAND_MIN_QUERY", 2)
    n = 4
    with kernel_backend("triton"):
        llm = LLM(str(folder), block_size=4, max_num_batched_tokens=8, enable_prefix_caching=True)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        runs = [llm.generate(PROMPTS, params) for _ in range(2)]
    assert llm.engine.kv.paged.pool.hits > 0
    for outs in runs:
        for out, prompt in zip(outs, PROMPTS):
            assert out.token_ids == hf_greedy(hf, prompt, n)[0]


@pytest.mark.gpu
def test_gpu_kernels_match_transformers(family):
    folder, hf = family
    n = 16
    outs = _generate(folder, n, device="cuda", dtype="float32")
    _assert_matches_hf(outs, hf, n)


@pytest.mark.gpu
def test_gpu_long_prompts_match_transformers(family):
    """Prompts long enough for SDPA on whole prompts and the expanded MLA form: first
    chunks of one length (SDPA), then ragged chunks over cached context (Triton)."""
    folder, hf = family
    prompts = [list(range(3, 83)), list(range(7, 87)), list(range(100, 141))]
    llm = LLM(str(folder), block_size=16, max_num_batched_tokens=64, device="cuda", dtype="float32")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for batch in (prompts[:2], prompts):
        for out, prompt in zip(llm.generate(batch, params), batch):
            assert out.token_ids == hf_greedy(hf, prompt, 8)[0]
