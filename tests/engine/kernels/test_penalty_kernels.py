"""The Triton bias/penalty kernels against their torch references (interpreter)."""

from __future__ import annotations

import torch

from engine.kernels import kernel_backend
from engine.ops.penalties import PenaltyTables, apply_penalties, count_sampled
from tests.engine.kernels.cases import interpreted


def tables(rows: int, vocab: int, seed: int = 0) -> PenaltyTables:
    g = torch.Generator().manual_seed(seed)
    p = PenaltyTables.empty(rows, vocab, torch.device("cpu"))
    p.flags.copy_(torch.tensor([1, 0, 1, 1, 0, 1])[:rows])
    p.counts.copy_(torch.randint(0, 4, (rows, vocab), generator=g) * (torch.rand(rows, vocab, generator=g) < 0.2))
    p.in_prompt.copy_(torch.rand(rows, vocab, generator=g) < 0.1)
    p.presence.copy_(torch.rand(rows, generator=g) * 4 - 2)
    p.frequency.copy_(torch.rand(rows, generator=g) * 4 - 2)
    p.repetition.copy_(torch.rand(rows, generator=g) * 2 + 0.2)
    for r, n in enumerate([min(k, vocab) for k in (3, 0, 150, 0, 5, 1)][:rows]):     # 150 entries: more than one block of the loop
        p.bias_ids[r, :n] = torch.randperm(vocab, generator=g)[:n].int()
        p.bias_vals[r, :n] = torch.rand(n, generator=g) * 200 - 100
        p.num_bias[r] = n
    return p


@interpreted
def test_apply_penalties_kernel_equals_reference():
    vocab = 5000      # more than one block of the dense loop
    p = tables(6, vocab)
    rows = torch.tensor([5, 0, 1, 3, 2], dtype=torch.int32)     # a batch in another order, one unflagged row
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(1)) * 3
    ref, out = logits.clone(), logits.clone()
    apply_penalties(ref, rows, p, backend="torch")
    apply_penalties(out, rows, p, backend="triton")
    assert torch.equal(out, ref)
    assert torch.equal(out[2], logits[2]), "a row without a flag is left alone"
    assert not torch.equal(out[0], logits[0])


@interpreted
def test_count_sampled_kernel_equals_reference():
    p_ref, p_tri = tables(6, 64), tables(6, 64)
    rows = torch.tensor([0, 1, 2, 3, 6 - 1], dtype=torch.int32)
    sampled = torch.tensor([4, 9, 63, 4, 0])
    mask = torch.tensor([1, 1, 1, 0, 1])       # entry 3 was mid-prefill: its sample is dropped
    count_sampled(rows, sampled, mask, p_ref, backend="torch")
    with kernel_backend("triton"):
        count_sampled(rows, sampled, mask, p_tri)
    assert torch.equal(p_tri.counts, p_ref.counts)
    before = tables(6, 64).counts
    assert p_ref.counts[0, 4] == before[0, 4] + 1 and p_ref.counts[1, 9] == before[1, 9]    # row 1: no flag
    assert p_ref.counts[3, 4] == before[3, 4]
