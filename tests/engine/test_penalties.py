"""Logit bias, presence / frequency / repetition penalties and prompt logprobs through
the engine, against a reference built on transformers' logits of a tiny model."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.ops.sampling import uniform_noise
from tests.engine.tiny_models import build

NEW = 12
PROMPTS = [[5, 17, 99, 3, 17, 17], list(range(40, 61)), [7] * 9]
ENGINE = dict(max_model_len=64, max_num_seqs=4, block_size=4, max_logprobs=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return build("llama", folder), str(folder)


def penalize(logits: torch.Tensor, prompt: list[int], out: list[int], sp: SamplingParams) -> torch.Tensor:
    """The documented semantics, written per token (independent of the engine's ops)."""
    x = logits.clone()
    for tok, bias in (sp.logit_bias or {}).items():
        x[tok] += bias
    for tok in set(prompt) | set(out):
        x[tok] = x[tok] / sp.repetition_penalty if x[tok] > 0 else x[tok] * sp.repetition_penalty
    for tok in set(out):
        x[tok] -= sp.frequency_penalty * out.count(tok) + sp.presence_penalty
    return x


def reference(hf, prompt: list[int], sp: SamplingParams, seed: int | None = None) -> list[int]:
    """Greedy, or Gumbel-max with the engine's documented noise (a function of seed,
    position and token), over transformers' logits plus the penalties."""
    out: list[int] = []
    for _ in range(sp.max_tokens):
        ids = prompt + out
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        x = penalize(logits, prompt, out, sp)
        if seed is not None:
            u = uniform_noise(torch.tensor([seed]), torch.tensor([len(ids)]), x.shape[0])[0]
            x = x / sp.temperature - torch.log(-torch.log(u))
        out.append(int(x.argmax()))
    return out


CASES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.8),
    "negative-frequency": dict(frequency_penalty=-1.0),
    "repetition": dict(repetition_penalty=1.8),
    "repetition-below-1": dict(repetition_penalty=0.5),
    "logit-bias": dict(logit_bias={"3": 5.0, 40: -100.0, 200: 2.5}),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={9: 3.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_with_penalties_matches_reference(tiny, case):
    hf, folder = tiny
    llm = LLM(folder, **ENGINE, max_num_batched_tokens=8)     # chunked prefill too
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, **CASES[case])
    plain = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp)
    base = llm.generate(PROMPTS, plain)
    for prompt, out, b in zip(PROMPTS, outs, base):
        assert out.token_ids == reference(hf, prompt, sp)
    assert any(o.token_ids != b.token_ids for o, b in zip(outs, base)), "the parameter changed nothing"


def test_seeded_sampling_with_penalties_matches_reference_and_ignores_the_batch(tiny):
    hf, folder = tiny
    sp = SamplingParams(max_tokens=NEW, temperature=0.8, seed=1234, ignore_eos=True, presence_penalty=0.7,
                        frequency_penalty=0.4, repetition_penalty=1.2, logit_bias={11: 4.0})
    alone = LLM(folder, **ENGINE).generate([PROMPTS[0]], sp)[0].token_ids
    assert alone == reference(hf, PROMPTS[0], sp, seed=1234)
    # In a batch with other requests (with and without penalties, other lengths, other
    # seeds), chunked and async: the same tokens.
    others = [SamplingParams(max_tokens=NEW + 3, temperature=1.0, seed=7, ignore_eos=True, frequency_penalty=2.0),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)]
    for extra in (dict(max_num_batched_tokens=7), dict(async_scheduling=True)):
        outs = LLM(folder, **ENGINE, **extra).generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], sp, others[1]])
        assert outs[1].token_ids == alone


def test_padded_decode_steps_apply_penalties(tiny):
    """The CUDA-graph step (run eagerly here, padded to the graph sizes) applies them too."""
    hf, folder = tiny
    llm = LLM(folder, **ENGINE)
    llm.engine.runner.capture_cuda_graphs(eager=True)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, repetition_penalty=1.8,
                        frequency_penalty=0.5)
    outs = llm.generate(PROMPTS[:3], [sp, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True), sp])
    assert outs[0].token_ids == reference(hf, PROMPTS[0], sp)
    assert outs[2].token_ids == reference(hf, PROMPTS[2], sp)


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("engine", [dict(max_num_batched_tokens=5), dict(async_scheduling=True)])
def test_prompt_logprobs_match_transformers_through_chunks_and_cache_hits(tiny, engine):
    hf, folder = tiny
    llm = LLM(folder, **ENGINE, enable_prefix_caching=True, **engine)
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3)
    llm.generate(PROMPTS, SamplingParams(max_tokens=1))          # fills the prefix cache
    hits_before = llm.engine.kv.paged.pool.hits
    outs = llm.generate(PROMPTS, sp)
    assert llm.engine.kv.paged.pool.hits == hits_before, "prompt-logprob requests must not use cache hits"
    llm.generate(PROMPTS, SamplingParams(max_tokens=1))
    assert llm.engine.kv.paged.pool.hits > hits_before, "the same prompts without prompt logprobs do hit"
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_prompt_logprobs(hf, prompt)
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for i in range(1, len(prompt)):
            entry = plp[i]
            assert abs(entry[prompt[i]] - ref[i - 1, prompt[i]].item()) < 2e-4
            top = ref[i - 1].topk(3)
            assert set(top.indices.tolist()) <= set(entry)
            assert len(entry) <= 4
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_penalties_survive_preemption(tiny):
    """A preempted request's counts are rebuilt from its tokens when it comes back."""
    hf, folder = tiny
    llm = LLM(folder, max_model_len=96, max_num_seqs=4, block_size=4, num_kv_blocks=24, max_num_batched_tokens=64)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **CASES["all"])
    outs = llm.generate(PROMPTS, sp)
    assert llm.engine.scheduler.num_preemptions > 0, "the tiny pool should force preemption"
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference(hf, prompt, sp)
