"""Step-input preparation and the post-step commit: Triton against the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.runner.inputs import commit_step, commit_step_ref, prepare_inputs, prepare_inputs_ref
from engine.runner.state import RequestStateTable
from tests.engine.kernels.cases import interpreted

FIELDS = ("input_ids", "positions", "query_start_loc", "seq_lens", "slot_mapping", "logits_indices", "block_table")


def table_case(device: str = "cpu", max_reqs: int = 12, max_len: int = 96, block_size: int = 4,
               computed=(0, 7, 30, 95, 12), scheduled=(9, 1, 5, 1, 40)):
    """A state table with rows in use at scattered indices; request i has computed[i]
    tokens cached and scheduled[i] to run this step."""
    g = torch.Generator().manual_seed(0)
    max_blocks = -(-max_len // block_size)
    t = RequestStateTable(max_reqs, max_len, max_blocks, torch.device(device))
    t.token_ids.copy_(torch.randint(0, 50000, t.token_ids.shape, generator=g))
    t.block_table.copy_(torch.randint(0, 1000, t.block_table.shape, generator=g))
    rows = torch.randperm(max_reqs, generator=g)[:len(computed)]
    for row, c, n in zip(rows.tolist(), computed, scheduled):
        t.num_computed[row] = c
        t.num_tokens[row] = min(c + n, max_len - 1)
    return t, rows.to(device), torch.tensor(scheduled, dtype=torch.int32, device=device), block_size


def _check_prepare(device, pad: int = 0, **kw):
    table, rows, nsched, bs = table_case(device, **kw)
    num_tokens = int(nsched.sum()) + pad
    ref = prepare_inputs_ref(table, rows, nsched, num_tokens, bs)
    out = prepare_inputs(table, rows, nsched, num_tokens, bs, backend="triton")
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(out, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def _check_commit(device):
    table, rows, nsched, _ = table_case(device)
    sampled = torch.randint(0, 50000, (rows.shape[0],), device=device)
    mask = torch.tensor([True, False, True, True, False], device=device)
    other = copy.deepcopy(table)
    commit_step_ref(table, rows, nsched, sampled, mask)
    commit_step(other, rows, nsched, sampled, mask, backend="triton")
    for name in ("token_ids", "num_tokens", "num_computed"):
        assert torch.equal(getattr(table, name), getattr(other, name)), name


@interpreted
def test_prepare_inputs():
    _check_prepare("cpu")


@interpreted
def test_prepare_inputs_single_request_long_prefill():
    _check_prepare("cpu", computed=(3,), scheduled=(600,), max_len=700)


@interpreted
def test_prepare_inputs_padded_batch():
    """A CUDA-graph batch: entries with no tokens and a padded token tail (id 0,
    position 0, slot -1), stale values in the tail never survive."""
    _check_prepare("cpu", pad=7, computed=(0, 7, 30, 0, 12), scheduled=(9, 1, 0, 1, 0))
    table, rows, nsched, bs = table_case("cpu", computed=(4, 8), scheduled=(1, 1))
    out = prepare_inputs(table, rows, nsched, 6, bs, backend="triton")
    assert out.slot_mapping[2:].tolist() == [-1] * 4 and out.input_ids[2:].tolist() == [0] * 4


@interpreted
def test_commit_step():
    _check_commit("cpu")


@pytest.mark.gpu
def test_prepare_inputs_gpu():
    n = 200
    _check_prepare("cuda", max_reqs=256, max_len=2048, block_size=16,
                   computed=tuple(range(0, 5 * n, 5)), scheduled=tuple([1] * (n - 2) + [1000, 3]))


@pytest.mark.gpu
def test_commit_step_gpu():
    _check_commit("cuda")
