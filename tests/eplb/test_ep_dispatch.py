"""Expert-parallel MoE dispatch/combine against the single-process layer: the normal
path over gloo all-to-alls, and the low-latency path through peer-mapped shared
memory, with its torch writes and with its Triton kernels (interpreted); SwiGLU
experts, and NemotronH's squared-ReLU ones (non-gated w13)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed.peer_memory import allocate_peer_memory
from engine.kernels import interpreting, kernel_backend
from engine.layers.ep_dispatch import ExpertParallel, attach_expert_parallel, combine_in_logical_order
from engine.layers.ep_low_latency import LowLatencyBuffers
from engine.layers.expert_map import ExpertMap
from engine.layers.moe import FusedMoE

E, H, I, K = 8, 32, 16, 3
TOKENS = [6, 0, 11, 3]        # rank 1 routes nothing: it still serves the others' tokens


def _layer(activation: str = "silu") -> FusedMoE:
    torch.manual_seed(0)
    moe = FusedMoE(E, H, I, activation=activation)
    with torch.no_grad():
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
    return moe


def _inputs(rank: int, n: int, seed: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(n, H, generator=g)
    ids = torch.rand(n, E, generator=g).argsort(1)[:, :K]
    return x, torch.rand(n, K, generator=g), ids


def _run(rank: int, world: int, port: int, phy2log: list[int], dispatch: str, activation: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        ref, moe = _layer(activation), _layer(activation)
        assert moe.w13.shape[1] == (2 * I if activation == "silu" else I)
        slots = len(phy2log) // world
        ep = ExpertParallel(rank, world, slots)
        attach_expert_parallel([moe], ep, ExpertMap.from_phy2log([phy2log], moe.num_experts))
        assert moe.w13.shape[0] == slots, "a rank holds only its own slots"
        if dispatch != "normal":
            shape = (world, CAPACITY, H, K, torch.float32)
            ep.low_latency = LowLatencyBuffers(allocate_peer_memory(LowLatencyBuffers.nbytes(*shape),
                                                                    torch.device("cpu"), None, 30), *shape[1:])
        # Two forwards through the same buffers, the second with other token counts:
        # nothing of the first may leak into it (stale rows, stale choices).
        for n, seed in ((TOKENS[rank], 100), (TOKENS[::-1][rank], 200)):
            x, w, ids = _inputs(rank, n, seed)
            with torch.inference_mode(), kernel_backend("triton" if dispatch == "low_latency_triton" else None):
                got = moe(x, w, ids)
            with torch.inference_mode():
                want = ref(x, w, ids)
            assert got.shape == want.shape
            # Same additions in the same order; the expert GEMMs see other row counts, so
            # float32 rounding may differ in the last bits (relu2 outputs are larger).
            scale = max(1.0, float(want.abs().max())) if n else 1.0
            assert torch.allclose(got, want, atol=1e-6 * scale, rtol=0), (dispatch, (got - want).abs().max(), scale)
        # Every routed (token, choice) was counted once, on the slot that served it.
        expected = TOKENS[rank] + TOKENS[::-1][rank]
        assert int(moe.expert_load.sum()) == expected * K
    finally:
        dist.destroy_process_group()


CAPACITY = 12


TRITON = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dispatch,activation", [
    ("normal", "silu"), ("low_latency", "silu"), pytest.param("low_latency_triton", "silu", marks=TRITON),
    ("normal", "relu2"), ("low_latency", "relu2"), pytest.param("low_latency_triton", "relu2", marks=TRITON),
])
def test_dispatch_combine_matches_single_process_layer(dispatch, activation) -> None:
    # 4 ranks x 4 slots: replicas (expert 3 four times, twice on rank 0), every rank
    # sends to every other. Two ranks without replicas run in test_ep_engine.py.
    phy2log = [3, 3, 0, 1, 2, 4, 5, 6, 7, 3, 0, 1, 5, 5, 2, 3]
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    mp.spawn(_run, args=(4, store.port, phy2log, dispatch, activation), nprocs=4)


def test_low_latency_refuses_more_tokens_than_its_capacity() -> None:
    from engine.layers.ep_low_latency import low_latency_moe
    buffers = LowLatencyBuffers.__new__(LowLatencyBuffers)
    buffers.capacity, buffers.top_k, buffers.hidden = 4, K, H
    x = torch.zeros(5, H)
    ids = torch.zeros(5, K, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the low-latency dispatch capacity of 4"):
        low_latency_moe(buffers, 4, _layer(), x, torch.ones(5, K), ids, ids)


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
