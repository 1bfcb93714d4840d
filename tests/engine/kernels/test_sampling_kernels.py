"""The Triton sampler must pick exactly the reference's tokens: same noise (regenerated
in-kernel from the integer hash), same filter sets (ties included), same tie-breaking."""

from __future__ import annotations

import pytest
import torch

from engine.ops.sampling import apply_filters, sample, sample_ref, topn_logprobs
from tests.engine.kernels.cases import interpreted

# One row per filter combination: (temperature, top_k, top_p, min_p).
SETTINGS = [
    (0.0, -1, 1.0, 0.0),      # greedy (filters ignored)
    (0.0, 5, 0.5, 0.1),
    (1.0, -1, 1.0, 0.0),      # plain sampling
    (0.7, 5, 1.0, 0.0),       # top-k
    (1.3, 50, 0.9, 0.0),      # top-k + top-p
    (1.0, -1, 0.5, 0.1),      # top-p + min-p
    (0.5, 3, 0.8, 0.0),
    (2.0, 100000, 0.3, 0.05), # k above the vocabulary
    (1.0, 1, 1.0, 0.0),       # top-1
    (1.0, -1, 1.0, 0.2),      # min-p alone
]


def batch(vocab: int, device: str = "cpu", scale: float = 3.0, seed: int = 0, rows: int | None = None):
    """bf16-valued logits (the engine's are): many exact ties near the top."""
    g = torch.Generator().manual_seed(seed)
    settings = SETTINGS * (1 if rows is None else -(-rows // len(SETTINGS)))
    settings = settings[:rows or len(settings)]
    n = len(settings)
    logits = (torch.randn(n, vocab, generator=g) * scale).bfloat16().float()
    t, k, p, m = (torch.tensor(col) for col in zip(*settings))
    seeds = torch.randint(0, 2**63 - 1, (n,), generator=g)
    positions = torch.randint(0, 100000, (n,), generator=g)
    to = lambda x, dt: x.to(dt).to(device)  # noqa: E731
    return (logits.to(device), to(t, torch.float32), to(k, torch.int32), to(p, torch.float32),
            to(m, torch.float32), seeds.to(device), positions.to(device))


def _kept_sets_match(logits, t, k, p, m):
    from engine.kernels.sampling import filter_thresholds
    thr = filter_thresholds(logits, t, k, p, m)
    temp = torch.where(t > 0, t, torch.ones_like(t))
    scaled = logits / temp[:, None]
    ref_keep = apply_filters(scaled, k, p, m) > float("-inf")
    ours = scaled >= thr[:, None]
    sampled_rows = t > 0
    assert torch.equal(ours[sampled_rows], ref_keep[sampled_rows])


@interpreted
@pytest.mark.parametrize("vocab", [1000, 37])
def test_filter_thresholds_keep_exactly_the_reference_sets(vocab):
    _kept_sets_match(*batch(vocab)[:5])


@interpreted
def test_sample_matches_reference_exactly():
    for seed in range(3):
        args = batch(1000, seed=seed)
        assert torch.equal(sample(*args, backend="triton"), sample_ref(*args))


@interpreted
def test_greedy_ties_pick_the_first_index():
    logits = torch.zeros(2, 3000)
    logits[0, [7, 2500]] = 5.0          # tie across sampling chunks
    logits[1, [100, 101]] = 1.0
    z = torch.zeros(2)
    out = sample(logits, z, torch.full((2,), -1, dtype=torch.int32), torch.ones(2), z,
                 torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), backend="triton")
    assert out.tolist() == [7, 100]


@interpreted
def test_topn_logprobs_online_lse():
    logits = torch.randn(3, 5000) * 4
    sampled = torch.tensor([4, 0, 4999])
    lp, ids, top = topn_logprobs(logits, sampled, 5, backend="triton")
    ref_lp, ref_ids, ref_top = topn_logprobs(logits, sampled, 5)
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(top, ref_top, atol=1e-5)
    assert torch.equal(ids, ref_ids)


# -- compiled, at real shapes ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151936, 102400])
def test_sample_gpu_exact(vocab):
    args = batch(vocab, "cuda", rows=64)
    _kept_sets_match(*args[:5])
    assert torch.equal(sample(*args), sample_ref(*args))


@pytest.mark.gpu
def test_topn_logprobs_gpu():
    logits = torch.randn(64, 151936, device="cuda") * 4
    sampled = torch.randint(0, 151936, (64,), device="cuda")
    lp, ids, top = topn_logprobs(logits, sampled, 20)
    ref_lp, ref_ids, ref_top = topn_logprobs(logits, sampled, 20, backend="torch")
    assert torch.allclose(lp, ref_lp, atol=1e-4) and torch.allclose(top, ref_top, atol=1e-4)
    assert torch.equal(ids, ref_ids)
