"""The draft head: one pass gives K drafts; the paged path (what a runner calls, with
the draft KV cache persisting between rounds) equals the dense path (what the
trainer uses); masked rows ignore what the caller put there; sampled drafts."""

import pytest
import torch

from engine.spec.head import PEagleHead
from tests.engine.spec.helpers import PagedCache, block_causal_mask, random_head

K = 3


def _inputs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    return torch.randint(0, 60, (T,), generator=g), torch.randn(T, 72, generator=g)


def test_layout_marks_the_last_k_minus_1_rows_and_samples_the_last_k():
    qsl = torch.tensor([0, 5, 8])
    is_mask, rows = PEagleHead.layout(qsl, 8, 3)
    assert is_mask.tolist() == [False, False, False, True, True, False, True, True]
    assert rows.tolist() == [[2, 3, 4], [5, 6, 7]]


def test_paged_rounds_equal_one_dense_pass():
    """Round 1 writes each request's context into the paged draft cache; round 2 sends
    only [NTP | K-1 MTP] rows. The drafts and logits equal one dense pass over
    context + NTP + MTP, and equal proposing everything in one paged call."""
    head = random_head()
    ctx = [5, 2]                        # context rows per request
    lengths = [c + K for c in ctx]
    ids, aux = _inputs(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths])
    qsl = torch.tensor([0] + lengths).cumsum(0)
    dense = head.propose(aux, ids, pos, qsl, block_causal_mask(lengths), K)

    cache = PagedCache(head, 2)
    meta, p, q = cache.step([list(range(n)) for n in lengths])
    one_call = head.propose(aux, ids, p, q, meta, K)
    assert torch.equal(one_call.draft_ids, dense.draft_ids)

    cache = PagedCache(head, 2)
    starts = qsl[:-1].tolist()
    ctx_rows = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, ctx)])
    meta, p, _ = cache.step([list(range(c)) for c in ctx])
    head.forward(ids[ctx_rows], aux[ctx_rows], p, torch.zeros(len(ctx_rows), dtype=torch.bool), meta)
    tail = torch.cat([torch.arange(s + c, s + c + K) for s, c in zip(starts, ctx)])
    meta, p, q = cache.step([list(range(c, c + K)) for c in ctx])
    second = head.propose(aux[tail], ids[tail], p, q, meta, K)
    assert torch.equal(second.draft_ids, dense.draft_ids)

    # Logits too, not just their argmax.
    is_mask, rows = PEagleHead.layout(qsl, sum(lengths), K)
    normed, _ = head(ids, aux, pos, is_mask, block_causal_mask(lengths))
    is_mask2, rows2 = PEagleHead.layout(q, len(tail), K)
    meta, p, _ = cache.step([list(range(c, c + K)) for c in ctx])
    normed2, _ = head(ids[tail], aux[tail], p, is_mask2, meta)
    torch.testing.assert_close(head.compute_logits(normed2[rows2.flatten()]),
                               head.compute_logits(normed[rows.flatten()]), rtol=1e-4, atol=1e-4)


def test_mask_rows_ignore_caller_tokens_and_hidden_states():
    head = random_head(3)
    lengths = [6]
    ids, aux = _inputs(lengths, 1)
    qsl, pos, mask = torch.tensor([0, 6]), torch.arange(6), block_causal_mask(lengths)
    a = head.propose(aux, ids, pos, qsl, mask, K)
    ids2, aux2 = ids.clone(), aux.clone()
    ids2[-(K - 1):] = 7
    aux2[-(K - 1):] = float("nan")     # garbage in masked rows must not leak
    b = head.propose(aux2, ids2, pos, qsl, mask, K)
    assert torch.equal(a.draft_ids, b.draft_ids)
    # ...while the NTP row's inputs matter.
    aux2[-K] += 3.0
    ids2[-K] = (ids[-K] + 1) % 60
    c = head.propose(aux2, ids2, pos, qsl, mask, K)
    assert not torch.equal(a.draft_ids, c.draft_ids)


def test_k_equal_one_and_bad_k():
    head = random_head()
    ids, aux = _inputs([4])
    out = head.propose(aux, ids, torch.arange(4), torch.tensor([0, 4]), block_causal_mask([4]), 1)
    assert out.draft_ids.shape == (1, 1)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        head.propose(aux, ids, torch.arange(4), torch.tensor([0, 4]), block_causal_mask([4]), 0)


def test_sampled_drafts_come_with_their_probabilities_in_the_target_vocab():
    # A reduced draft vocabulary: draft id i is target id 2 * i.
    head = random_head(5, draft_vocab_size=30)
    head.set_d2t(torch.arange(30))
    lengths = [5, 4]
    ids, aux = _inputs(lengths, 2)
    qsl, pos = torch.tensor([0, 5, 9]), torch.cat([torch.arange(5), torch.arange(4)])
    temp, seeds = torch.tensor([0.8, 0.0]), torch.tensor([11, 12])
    out = head.propose(aux, ids, pos, qsl, block_causal_mask(lengths), K, temp, seeds)
    assert out.draft_probs.shape == (2, K, 61)
    torch.testing.assert_close(out.draft_probs.sum(-1), torch.ones(2, K))
    assert (out.draft_probs[..., 1::2] == 0).all()            # odd target ids are not in the draft vocab
    assert (out.draft_ids % 2 == 0).all()
    # Each draft has probability > 0 under its q; the greedy row's q is one-hot at its argmax.
    assert (out.draft_probs.gather(2, out.draft_ids[..., None]) > 0).all()
    greedy = head.propose(aux, ids, pos, qsl, block_causal_mask(lengths), K)
    assert torch.equal(out.draft_ids[1], greedy.draft_ids[1])
    # Seeded: same seeds, same drafts; other seeds, (eventually) other drafts.
    again = head.propose(aux, ids, pos, qsl, block_causal_mask(lengths), K, temp, seeds)
    assert torch.equal(again.draft_ids, out.draft_ids)
    others = {tuple(head.propose(aux, ids, pos, qsl, block_causal_mask(lengths), K, temp,
                                 torch.tensor([s, 12])).draft_ids[0].tolist()) for s in range(20)}
    assert len(others) > 1
