"""The speculative step's bookkeeping (engine/runner/spec_inputs.py): each Triton kernel
equals its torch reference exactly, on batches that mix decoding requests with drafts
(some rejected: stale head rows), prefill chunks that do not sample, requests at the
end of max_model_len, and padded CUDA-graph entries (the pad row, no tokens)."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch

from engine.runner.spec_inputs import (
    commit_verified,
    commit_verified_ref,
    head_rows,
    head_rows_ref,
    verify_inputs,
    verify_inputs_ref,
    write_drafts,
    write_drafts_ref,
)
from engine.runner.state import RequestStateTable
from engine.spec.rejection import rejection_sample
from tests.engine.kernels.cases import interpreted

K, L, BS = 4, 40, 4
# (computed before the step, scheduled, drafts verified, samples, emitted); None: a padded
# graph entry (the pad row: nothing scheduled, K drafts, no sample).
MIXED = [(10, 5, 4, 1, 2), (0, 9, 0, 0, 0), (L - 3, 5, 4, 1, 5), (7, 1, 0, 1, 1), (20, 5, 4, 1, 1),
         (L - 6, 3, 2, 1, 3), None, None]
DECODE = [(12, 5, 4, 1, 5), (30, 5, 4, 1, 1), None]
ONE = [(L - 2, 1, 0, 1, 1)]


def spec_case(entries, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    max_reqs = 10
    t = RequestStateTable(max_reqs, L, -(-L // BS), torch.device(device))
    t.token_ids[:max_reqs] = torch.randint(0, 300, (max_reqs, L), generator=g, dtype=torch.int32)
    t.block_table[:max_reqs] = torch.randint(0, 500, (max_reqs, t.block_table.shape[1]), generator=g,
                                             dtype=torch.int32)
    t.temperature[:max_reqs] = torch.rand(max_reqs, generator=g)
    t.seeds[:max_reqs] = torch.randint(0, 2**40, (max_reqs,), generator=g)
    t.top_k[:max_reqs] = torch.randint(0, 50, (max_reqs,), generator=g, dtype=torch.int32)
    t.top_p[:max_reqs] = torch.rand(max_reqs, generator=g)
    t.min_p[:max_reqs] = torch.rand(max_reqs, generator=g)
    free = torch.randperm(max_reqs, generator=g).tolist()
    rows, nsched, ndraft, samples, emitted = [], [], [], [], []
    for e in entries:
        c, n, d, s, em = (0, 0, K, 0, 0) if e is None else e
        row = t.pad_row if e is None else free.pop()
        if e is not None:
            t.num_computed[row] = c
            t.num_tokens[row] = min(c + n, L)
        rows.append(row), nsched.append(n), ndraft.append(d), samples.append(s), emitted.append(em)
    i64 = lambda x: torch.tensor(x, dtype=torch.int64, device=device)
    rows, nsched, ndraft, samples, emitted = map(i64, (rows, nsched, ndraft, samples, emitted))
    qsl = torch.zeros(len(entries) + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.cumsum(nsched, 0)
    seq_lens = (t.num_computed[rows] + nsched).to(torch.int32)
    return t, rows, nsched, ndraft, samples, emitted, qsl, seq_lens


def _same(a, b, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what


def _same_fields(ref, out) -> None:
    for f in fields(ref):
        a, b = getattr(ref, f.name), getattr(out, f.name)
        for i, (x, y) in enumerate(zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]):
            _same(x, y, f"{f.name}[{i}]")


@interpreted
@pytest.mark.parametrize("entries", [MIXED, DECODE, ONE])
def test_verify_inputs(entries):
    t, rows, _, ndraft, _, _, qsl, seq_lens = spec_case(entries)
    num_logits = int((ndraft + 1).sum())
    ref = verify_inputs_ref(t, rows, ndraft, qsl, seq_lens, num_logits, K)
    v = verify_inputs(t, rows, ndraft, qsl, seq_lens, num_logits, K, backend="triton")
    _same_fields(ref, v)
    # The rejection sampler's kernel path with the per-row filters given equals it
    # gathering them itself.
    logits = torch.randn(num_logits, 64, generator=torch.Generator().manual_seed(0))
    args = (logits, v.drafts % 64, ndraft, v.temperature, v.seeds, v.positions)
    kw = dict(cu_num_logits=v.cu_num_logits, top_k=v.top_k, top_p=v.top_p, min_p=v.min_p, backend="triton")
    a, b = rejection_sample(*args, **kw), rejection_sample(*args, **kw, row_filters=v.row_filters)
    _same(a.token_ids, b.token_ids, "tokens")
    _same(a.num_sampled, b.num_sampled, "num_sampled")


@interpreted
@pytest.mark.parametrize("entries", [MIXED, DECODE, ONE])
def test_commit_verified(entries):
    t, rows, nsched, ndraft, samples, emitted, _, _ = spec_case(entries, seed=1)
    # The rejection sampler's output: emitted tokens, -1 after the last.
    num_sampled = torch.where(samples.bool(), emitted, 1).to(torch.int32)
    tokens = torch.randint(0, 300, (rows.shape[0], K + 1), generator=torch.Generator().manual_seed(1))
    tokens = torch.where(torch.arange(K + 1) < num_sampled[:, None], tokens, -1)
    other = copy.deepcopy(t)
    e_ref = commit_verified_ref(t, rows, nsched, ndraft, samples.bool(), tokens, num_sampled)
    e_out = commit_verified(other, rows, nsched, ndraft, samples, tokens, num_sampled, backend="triton")
    _same(e_ref, e_out, "emitted")
    for name in ("token_ids", "num_tokens", "num_computed"):
        _same(getattr(t, name), getattr(other, name), name)
    assert not t.token_ids[t.pad_row].any() and not t.num_tokens[t.pad_row] and not t.num_computed[t.pad_row]


@interpreted
@pytest.mark.parametrize("entries", [MIXED, DECODE, ONE])
def test_head_rows_of_every_pass(entries):
    """The parallel pass, and each pass of the chain drafter."""
    t, rows, nsched, ndraft, samples, emitted, qsl, seq_lens = spec_case(entries, seed=2)
    n_rows = torch.where(nsched > 0, nsched + K - 1, ndraft + K)
    extra = -(-2 * K // BS) + 1
    for step, count in [(-1, n_rows), (0, n_rows - (K - 1))] + [(c, torch.ones_like(n_rows)) for c in range(1, K)]:
        args = (t, rows, nsched, ndraft, samples, emitted, seq_lens, qsl, K, step, int(count.sum()), BS, extra)
        ref = head_rows_ref(*args)
        _same_fields(ref, head_rows(*args, backend="triton"))
        if step < 0:
            # Stale rows and rows past max_model_len write no KV; pad entries none at all.
            assert (ref.slot_mapping >= 0).sum() < ref.slot_mapping.numel()


@interpreted
@pytest.mark.parametrize("entries", [MIXED, DECODE, ONE])
def test_write_drafts(entries):
    t, rows, _, _, samples, _, _, _ = spec_case(entries, seed=3)
    g = torch.Generator().manual_seed(3)
    d2t = torch.randint(0, 40, (200,), generator=g)
    draft_ids = torch.randint(0, 200, (rows.shape[0], K), generator=g)
    other = copy.deepcopy(t)
    write_drafts_ref(t, rows, draft_ids, d2t, samples.bool())
    write_drafts(other, rows, draft_ids, d2t, samples, backend="triton")
    _same(t.token_ids, other.token_ids, "token_ids")
    assert not t.token_ids[t.pad_row].any()


@pytest.mark.gpu
def test_spec_inputs_gpu():
    """Compiled: every kernel against its reference on one mixed batch."""
    t, rows, nsched, ndraft, samples, emitted, qsl, seq_lens = spec_case(MIXED, device="cuda")
    num_logits = int((ndraft + 1).sum())
    _same_fields(verify_inputs_ref(t, rows, ndraft, qsl, seq_lens, num_logits, K),
                 verify_inputs(t, rows, ndraft, qsl, seq_lens, num_logits, K))
    n_rows = torch.where(nsched > 0, nsched + K - 1, ndraft + K)
    args = (t, rows, nsched, ndraft, samples, emitted, seq_lens, qsl, K, -1, int(n_rows.sum()), BS, 3)
    _same_fields(head_rows_ref(*args), head_rows(*args))
    num_sampled = torch.where(samples.bool(), emitted, 1).to(torch.int32)
    tokens = torch.where(torch.arange(K + 1, device="cuda") < num_sampled[:, None], 7, -1)
    other = copy.deepcopy(t)
    _same(commit_verified_ref(t, rows, nsched, ndraft, samples.bool(), tokens, num_sampled),
          commit_verified(other, rows, nsched, ndraft, samples, tokens, num_sampled), "emitted")
    d2t = torch.arange(200, device="cuda") % 5
    draft_ids = (torch.arange(rows.shape[0] * K, device="cuda") % 200).view(-1, K)
    write_drafts_ref(t, rows, draft_ids, d2t, samples.bool())
    write_drafts(other, rows, draft_ids, d2t, samples)
    for name in ("token_ids", "num_tokens", "num_computed"):
        _same(getattr(t, name), getattr(other, name), name)
