"""Expert-parallel MoE dispatch/combine over gloo against the single-process layer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.layers.ep_dispatch import ExpertParallel, attach_expert_parallel, combine_in_logical_order, expert_maps
from engine.layers.moe import FusedMoE

E, H, I, K = 8, 32, 16, 3
TOKENS = [6, 0, 11, 3]        # rank 1 routes nothing: it still serves the others' tokens


class _Model(torch.nn.Module):
    def __init__(self, moe: FusedMoE) -> None:
        super().__init__()
        self.moe = moe

    def moe_layers(self) -> list[FusedMoE]:
        return [self.moe]


def _layer() -> FusedMoE:
    torch.manual_seed(0)
    moe = FusedMoE(E, H, I)
    with torch.no_grad():
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
    return moe


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = TOKENS[rank]
    x = torch.randn(n, H, generator=g)
    ids = torch.rand(n, E, generator=g).argsort(1)[:, :K]
    return x, torch.rand(n, K, generator=g), ids


def _run(rank: int, world: int, port: int, phy2log: list[int]) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        ref, moe = _layer(), _layer()
        slots = len(phy2log) // world
        ep = ExpertParallel(rank, world, slots)
        attach_expert_parallel(_Model(moe), ep, torch.tensor([phy2log]))
        assert moe.w13.shape[0] == slots, "a rank holds only its own slots"
        x, w, ids = _inputs(rank)
        with torch.inference_mode():
            got, want = moe(x, w, ids), ref(x, w, ids)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
        # Every routed (token, choice) was counted once, on the slot that served it.
        assert int(moe.expert_load.sum()) == x.shape[0] * K
        counted = torch.zeros(E, dtype=torch.long).index_add_(0, torch.tensor(phy2log), moe.expert_load)
        assert torch.equal(counted, torch.bincount(ids.flatten(), minlength=E))
    finally:
        dist.destroy_process_group()


def test_dispatch_combine_matches_single_process_layer() -> None:
    # 4 ranks x 4 slots: replicas (expert 3 four times, twice on rank 0), every rank
    # sends to every other. Two ranks without replicas run in test_ep_engine.py.
    phy2log = [3, 3, 0, 1, 2, 4, 5, 6, 7, 3, 0, 1, 5, 5, 2, 3]
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    mp.spawn(_run, args=(4, store.port, phy2log), nprocs=4)


def test_combine_sums_in_logical_order_whatever_the_dispatch_order() -> None:
    # Three outputs per token whose float sum depends on the order of additions.
    vals = torch.tensor([1e8, 1.0, -1e8])
    logical = torch.tensor([[5, 1, 7]])          # ascending logical order: 1.0, 1e8, -1e8
    order = torch.tensor([2, 0, 1])              # dispatch order of the three pairs
    back = vals[order].unsqueeze(1)              # what comes back, in dispatch order
    out = combine_in_logical_order(back, order, logical, torch.zeros(1, 1))
    # float32: (1 + 1e8) rounds to 1e8, so the logical order gives 0; summing in
    # dispatch order (-1e8 + 1e8 + 1) would give 1.
    assert out.item() == 0.0
    assert ((back[0] + back[1]) + back[2]).item() == 1.0


def test_expert_maps_skip_empty_slots_and_need_every_expert() -> None:
    phy2log, log2phy, logcnt = expert_maps(torch.tensor([2, -1, 0, 1, 2, -1]), 3)
    assert logcnt.tolist() == [1, 1, 2]
    assert log2phy.tolist() == [[2, -1], [3, -1], [0, 4]]
    with pytest.raises(ValueError, match=r"experts \[1\] have no slot"):
        expert_maps(torch.tensor([0, 2, -1]), 3)
