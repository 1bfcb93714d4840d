"""MoE routing kernels (softmax top-k; physical map with load count) against their
torch references."""

from __future__ import annotations

import pytest
import torch

from engine.ops.router import (counting_tokens, softmax_topk, softmax_topk_physical, softmax_topk_ref, to_physical,
                               to_physical_ref)
from tests.engine.kernels.cases import interpreted, rel_err


def _check_topk(device):
    g = torch.Generator().manual_seed(0)
    for E, k, renorm, scale, dtype in ((8, 2, True, 1.0, torch.bfloat16), (64, 6, False, 2.5, torch.float32),
                                       (128, 8, True, 1.0, torch.float32), (60, 3, False, 1.0, torch.float32)):
        logits = (torch.randn(7, E, generator=g) * 2).to(device)
        w, ids = softmax_topk(logits, k, renorm, scale, dtype, backend="triton")
        rw, rids = softmax_topk_ref(logits.double(), k, renorm, scale, torch.float64)
        assert ids.dtype == torch.int64 and w.dtype == dtype
        assert torch.equal(ids.cpu(), rids.cpu())
        assert torch.allclose(w.double().cpu(), rw.cpu(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def _check_physical(device):
    g = torch.Generator().manual_seed(1)
    E, slots = 6, 9
    # Experts 0, 2 and 5 have two or three replicas; padding entries are -1.
    log2phy = torch.tensor([[0, 6, -1], [1, -1, -1], [2, 7, 8], [3, -1, -1], [4, -1, -1], [5, -1, -1]])
    logcnt = torch.tensor([2, 1, 3, 1, 1, 1])
    ids = torch.randint(0, E, (11, 3), generator=g)
    load, ref_load = torch.zeros(slots, dtype=torch.long), torch.zeros(slots, dtype=torch.long)
    dev = lambda t: t.to(device)  # noqa: E731
    load = dev(load)
    phys = to_physical(dev(ids), dev(log2phy), dev(logcnt), load, backend="triton")
    ref = to_physical_ref(ids, log2phy, logcnt, ref_load)
    assert torch.equal(phys.cpu(), ref) and torch.equal(load.cpu(), ref_load)
    assert int(ref_load.sum()) == ids.numel() and (ref >= 0).all()
    # Inside a padded step only the first 4 tokens' entries count.
    load.zero_()
    ref_load.zero_()
    with counting_tokens(dev(torch.tensor([4]))):
        to_physical(dev(ids), dev(log2phy), dev(logcnt), load, backend="triton")
    with counting_tokens(torch.tensor([4])):
        to_physical(ids, log2phy, logcnt, ref_load, backend="torch")
    assert torch.equal(load.cpu(), ref_load) and int(ref_load.sum()) == 4 * 3


def _check_topk_physical(device):
    """Top-k, map and load count in one launch equal softmax_topk_ref then
    to_physical_ref, replicas and padded tokens included."""
    g = torch.Generator().manual_seed(2)
    log2phy = torch.tensor([[0, 6, -1], [1, -1, -1], [2, 7, 8], [3, -1, -1], [4, -1, -1], [5, -1, -1]])
    logcnt = torch.tensor([2, 1, 3, 1, 1, 1])
    dev = lambda t: t.to(device)  # noqa: E731
    for renorm, scale, dtype, valid in ((True, 1.0, torch.bfloat16, None), (False, 2.5, torch.float32, 3)):
        logits = torch.randn(5, 6, generator=g) * 2
        load, ref_load = dev(torch.zeros(9, dtype=torch.long)), torch.zeros(9, dtype=torch.long)
        with counting_tokens(None if valid is None else dev(torch.tensor([valid]))):
            w, ids, phys, _ = softmax_topk_physical(dev(logits), 3, renorm, dev(log2phy), dev(logcnt), load, scale,
                                                    dtype, backend="triton")
        rw, rids = softmax_topk_ref(logits.double(), 3, renorm, scale, torch.float64)
        rphys = to_physical_ref(rids, log2phy, logcnt, ref_load, None if valid is None else torch.tensor([valid]))
        assert w.dtype == dtype and torch.equal(ids.cpu(), rids) and torch.equal(phys.cpu(), rphys)
        assert torch.allclose(w.double().cpu(), rw, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
        assert torch.equal(load.cpu(), ref_load) and int(ref_load.sum()) == 3 * (valid or 5)


def _check_route_align(device):
    """At decode sizes the routing launch also sorts the entries for the experts' GEMMs:
    the MoE on that sort equals the reference MoE on the same slots."""
    from engine.ops.moe import fused_moe, fused_moe_ref, plan_alignment
    g = torch.Generator().manual_seed(3)
    log2phy = torch.tensor([[0, 6, -1], [1, -1, -1], [2, 7, 8], [3, -1, -1], [4, -1, -1], [5, -1, -1]])
    logcnt = torch.tensor([2, 1, 3, 1, 1, 1])
    H, I, k = 32, 16, 3
    dev = lambda t: t.to(device)  # noqa: E731
    w13, w2 = dev(torch.randn(9, 2 * I, H, generator=g) / H ** 0.5), dev(torch.randn(9, H, I, generator=g) / I ** 0.5)
    for T in (1, 5):
        x, logits = dev(torch.randn(T, H, generator=g)), dev(torch.randn(T, 6, generator=g))
        load = dev(torch.zeros(9, dtype=torch.long))
        a = plan_alignment(x, w13, k)
        w, _, phys, filled = softmax_topk_physical(logits, k, True, dev(log2phy), dev(logcnt), load,
                                                   backend="triton", alignment=a)
        assert filled is a
        counts = torch.bincount(phys.flatten().cpu(), minlength=9)
        bm = a.config.block_m
        assert int(a.cursor[9]) == int(((counts + bm - 1) // bm).sum())      # blocks in use
        out = fused_moe(x, w13, w2, phys, w, backend="triton", alignment=filled)
        ref = fused_moe_ref(x.double(), w13.double(), w2.double(), phys, w.double())
        assert rel_err(out, ref) < 1e-5


def _check_nan_rows(device):
    """Garbage (NaN) rows, as padded graph entries may hold, still get valid ids."""
    logits = torch.randn(3, 16).to(device)
    logits[1] = float("nan")
    w, ids = softmax_topk(logits, 4, True, backend="triton")
    assert ((ids >= 0) & (ids < 16)).all() and torch.isfinite(w[[0, 2]]).all()


@interpreted
def test_softmax_topk():
    _check_topk("cpu")


@interpreted
def test_softmax_topk_physical_in_one_launch():
    _check_topk_physical("cpu")


@interpreted
def test_routing_launch_sorts_entries_for_the_moe():
    _check_route_align("cpu")


@interpreted
def test_softmax_topk_nan_rows_give_valid_ids():
    _check_nan_rows("cpu")


@interpreted
def test_to_physical_with_replicas_counts_load():
    _check_physical("cpu")


@pytest.mark.gpu
def test_router_kernels_gpu():
    _check_topk("cuda")
    _check_physical("cuda")
    _check_topk_physical("cuda")
    _check_route_align("cuda")
    _check_nan_rows("cuda")
