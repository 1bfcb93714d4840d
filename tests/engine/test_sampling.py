"""Sampler semantics, tested statistically on a fixed distribution."""

from __future__ import annotations


import pytest
import torch

from engine.ops.sampling import sample_ref, topn_logprobs, uniform_noise

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
N = 20000


def draw(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, n=N, probs=PROBS):
    """Sample n times from one distribution, one seed per draw."""
    logits = probs.log()[None, :].expand(n, -1).contiguous()
    full = lambda v, dt=torch.float32: torch.full((n,), v, dtype=dt)  # noqa: E731
    tokens = sample_ref(logits, full(temperature), full(top_k, torch.int32), full(top_p), full(min_p),
                        torch.arange(n, dtype=torch.int64) * 7919 + 1, full(5, torch.int64))
    return torch.bincount(tokens, minlength=len(probs)).float() / n


def close(freq, expected, tol=0.015):
    assert torch.allclose(freq, expected, atol=tol), (freq, expected)


def test_plain_sampling_follows_softmax():
    close(draw(), PROBS)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        p = PROBS ** (1 / t)
        close(draw(temperature=t), p / p.sum())


def test_greedy_is_argmax():
    assert draw(temperature=0.0, n=100)[0] == 1.0


def test_top_k_renormalises_over_k_best():
    p = PROBS.clone()
    p[2:] = 0
    close(draw(top_k=2), p / p.sum())


def test_top_p_keeps_smallest_nucleus():
    # cumulative 0.4, 0.65, 0.8: top_p=0.7 keeps the first three tokens.
    p = PROBS.clone()
    p[3:] = 0
    close(draw(top_p=0.7), p / p.sum())


def test_min_p_drops_tokens_below_fraction_of_max():
    # min_p=0.3 -> threshold 0.12: keeps 0.4, 0.25, 0.15.
    p = PROBS.clone()
    p[3:] = 0
    close(draw(min_p=0.3), p / p.sum())


def test_noise_is_a_function_of_seed_position_token_only():
    seeds = torch.tensor([1, 2, 3, 1], dtype=torch.int64)
    pos = torch.tensor([10, 10, 11, 10], dtype=torch.int64)
    u = uniform_noise(seeds, pos, 64)
    assert torch.equal(u[0], u[3])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert bool((u > 0).all() and (u < 1).all())
    # Row independence: the same row alone gives the same noise.
    assert torch.equal(uniform_noise(seeds[2:3], pos[2:3], 64)[0], u[2])


def test_noise_is_uniform():
    u = uniform_noise(torch.arange(200, dtype=torch.int64), torch.zeros(200, dtype=torch.int64), 512).flatten()
    assert abs(u.mean().item() - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.01)


def test_topn_logprobs():
    logits = torch.randn(3, 50)
    sampled = torch.tensor([4, 0, 49])
    lp, ids, top = topn_logprobs(logits, sampled, 5)
    ref = logits.log_softmax(-1)
    assert torch.allclose(lp, ref.gather(1, sampled[:, None]).squeeze(1))
    assert torch.equal(ids, ref.topk(5).indices) and torch.allclose(top, ref.topk(5).values)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_seeded_sampling_is_reproducible_and_batch_independent(default_llm, temperature):
    from engine import SamplingParams
    sp = SamplingParams(max_tokens=12, temperature=temperature, top_p=0.9, seed=1234, ignore_eos=True)
    alone = default_llm.generate(["a seeded prompt"], sp)[0].token_ids
    again = default_llm.generate(["a seeded prompt"], sp)[0].token_ids
    others = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    batch = default_llm.generate(["other text", "a seeded prompt", "more and more text here"],
                                 [others, sp, others])
    assert alone == again == batch[1].token_ids
    different_seed = SamplingParams(max_tokens=12, temperature=temperature, top_p=0.9, seed=99, ignore_eos=True)
    assert default_llm.generate(["a seeded prompt"], different_seed)[0].token_ids != alone
