"""Fused MoE: the Triton align + grouped GEMMs against the per-expert torch reference."""

from __future__ import annotations

import functools

import pytest
import torch

from engine.ops.moe import fused_moe, fused_moe_ref
from tests.engine.kernels.cases import TOL, interpreted, rel_err


def moe_case(tokens: int, experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype,
             device: str = "cpu", skew: float = 0.0):
    """Random weights at unit-ish output scale; `skew` > 0 concentrates routing on
    few experts (uneven runs, idle experts)."""
    g = torch.Generator().manual_seed(tokens * 131 + experts)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(tokens, experts, generator=g) - skew * torch.arange(experts) / experts
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return to(x), to(w13), to(w2), ids.to(device), weights.to(device)


def _check(tokens, experts, hidden, inter, top_k, dtype, device="cpu", config=None, skew=0.0):
    x, w13, w2, ids, w = moe_case(tokens, experts, hidden, inter, top_k, dtype, device, skew)
    ref = fused_moe_ref(x.double(), w13.double(), w2.double(), ids, w.double())
    if config is None:
        out = fused_moe(x, w13, w2, ids, w.to(dtype), backend="triton")
    else:
        from engine.kernels.moe import MoEConfig, fused_moe_triton
        out = fused_moe_triton(x, w13, w2, ids, w.to(dtype), MoEConfig(*config))
    assert out.dtype == dtype and out.shape == x.shape
    err = rel_err(out, ref)
    assert err < TOL[dtype], err


@interpreted
@pytest.mark.parametrize("tokens,experts,hidden,inter,top_k,config,skew", [
    (1, 8, 64, 32, 2, None, 0.0),                     # decode: one token
    (5, 8, 64, 32, 2, None, 0.0),
    (37, 8, 64, 48, 2, None, 4.0),                    # skewed: idle experts, long runs
    (70, 6, 80, 40, 3, (32, 32, 32, 4, 2), 0.0),      # sizes off the tile grid
    (200, 16, 64, 32, 4, (16, 32, 32, 4, 2), 0.0),    # several align chunks' worth of blocks
])
def test_fused_moe_fp32(tokens, experts, hidden, inter, top_k, config, skew):
    _check(tokens, experts, hidden, inter, top_k, torch.float32, config=config, skew=skew)


@interpreted
def test_fused_moe_bf16():
    _check(37, 8, 64, 48, 2, torch.bfloat16)


# Tile walks (MoEConfig's group_m, persistent, flatten, tma[, down_block_n]): the interpreter gives a
# few programs per "SM", so a persistent program loops over several tiles; hidden 80
# is off the 32-wide K tile (TMA's zero fill at the K edge), inter 40 off the N tile
# (gate tiles reading into up rows, masked at the store).
WALKS = {"grouped": (1, 0, False, False), "grouped-tma": (2, 0, False, True), "persistent": (0, 1, False, False),
         "persistent-flatten-tma": (2, 2, True, True), "wide-down-tma": (8, 0, False, True, 256)}


@interpreted
@pytest.mark.parametrize("walk", WALKS.values(), ids=WALKS.keys())
def test_fused_moe_tile_walks(walk):
    _check(70, 6, 80, 40, 3, torch.float32, config=(16, 32, 32, 4, 2, *walk), skew=3.0)


@interpreted
def test_fused_moe_tile_walks_bf16():
    _check(37, 8, 64, 48, 2, torch.bfloat16, config=(16, 32, 32, 4, 2, *WALKS["persistent-flatten-tma"]))


@interpreted
def test_entries_of_id_minus_one_are_skipped():
    """Expert parallelism marks choices another rank serves with -1: they add nothing,
    and the uncombined per-entry outputs match the reference entry by entry."""
    from engine.kernels.moe import MoEConfig, moe_entries_triton
    from engine.ops.moe import moe_entries_ref
    x, w13, w2, ids, w = moe_case(23, 8, 64, 32, 3, torch.float32)
    ids = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.4, -1)
    ids[0] = -1                                     # a token with no choice at all
    ref = fused_moe_ref(x, w13, w2, ids, w)
    assert ref[0].abs().max() == 0
    assert rel_err(fused_moe(x, w13, w2, ids, w, backend="triton"), ref) < TOL[torch.float32]
    want = moe_entries_ref(x, w13, w2, ids, w)
    used = ids.reshape(-1) >= 0
    for config in (None, MoEConfig(16, 32, 32, 4, 2, *WALKS["persistent-flatten-tma"])):
        entries = moe_entries_triton(x, w13, w2, ids, w, config)
        assert rel_err(entries[used], want[used]) < TOL[torch.float32]
    assert torch.allclose(want.view(23, 3, -1).sum(1), ref, atol=1e-5)


def _check_shared_add(dtype, device):
    """The shared experts' output added inside the combine's launch gives the bits of
    the separate add, padded entries (-1) and all."""
    for tokens, top_k in ((1, 2), (7, 3)):
        x, w13, w2, ids, w = moe_case(tokens, 8, 64, 32, top_k, dtype, device)
        ids[0, 0] = -1
        shared = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        for backend in ("triton", "torch"):
            fused = fused_moe(x, w13, w2, ids, w.to(dtype), backend=backend, shared_out=shared)
            assert torch.equal(fused, fused_moe(x, w13, w2, ids, w.to(dtype), backend=backend) + shared)


@interpreted
def test_shared_experts_add_in_combine_is_exact():
    # float32 only here: the interpreter's bf16 rounding is not torch's (the gpu test has both).
    _check_shared_add(torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_experts_add_in_combine_gpu(dtype):
    _check_shared_add(dtype, "cuda")


@interpreted
def test_align_covers_every_entry_once():
    from engine.kernels.moe import _align_kernel
    import triton
    ids = torch.randint(0, 5, (1500,), generator=torch.Generator().manual_seed(0))
    ids[:300] = 3                                     # one long run
    bm, E, N = 16, 7, ids.numel()
    max_blocks = N // bm + min(E, N)
    sorted_ids = torch.full((max_blocks * bm,), -7, dtype=torch.int32)
    block_expert = torch.empty(max_blocks, dtype=torch.int32)
    cursor = torch.empty(E + 1, dtype=torch.int32)
    _align_kernel[(1,)](ids, N, E, sorted_ids, block_expert, cursor, max_blocks, BLOCK_M=bm,
                        BINS=triton.next_power_of_2(E + 1), CHUNK=1024, BCHUNK=64)
    counts = torch.bincount(ids, minlength=E)
    padded = (counts + bm - 1) // bm * bm
    starts = torch.cumsum(padded, 0) - padded
    assert torch.equal(cursor[:E].long(), starts + counts)
    assert int(cursor[E]) == int(padded.sum()) // bm         # the blocks in use
    seen = []
    for e in range(E):
        run = sorted_ids[starts[e]:starts[e] + counts[e]].long()
        assert bool((ids[run] == e).all())
        seen.append(run)
        blocks = block_expert[starts[e] // bm:(starts[e] + padded[e]) // bm]
        assert bool((blocks == e).all())
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(N))
    assert bool((block_expert[int(padded.sum()) // bm:] == -1).all())


# -- compiled, at real shapes ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 256, 2048])
@pytest.mark.parametrize("shape", [(128, 2048, 768, 8), (64, 2048, 1408, 6)], ids=["qwen3-30b-a3b", "dsv2-lite"])
def test_fused_moe_gpu(tokens, shape):
    experts, hidden, inter, top_k = shape
    _check(tokens, experts, hidden, inter, top_k, torch.bfloat16, "cuda")


@functools.cache
def _dsv2_case():
    """2048 tokens at DeepSeek-V2-Lite's expert shape and their float64 reference, built once."""
    x, w13, w2, ids, w = moe_case(2048, 64, 2048, 1408, 6, torch.bfloat16, "cuda")
    return x, w13, w2, ids, w, fused_moe_ref(x.double(), w13.double(), w2.double(), ids, w.double())


@pytest.mark.gpu
@pytest.mark.parametrize("walk", WALKS.values(), ids=WALKS.keys())
@pytest.mark.parametrize("tiles", [(16, 64, 128, 4, 3), (128, 128, 64, 8, 3)], ids=["decode-tiles", "prefill-tiles"])
def test_fused_moe_gpu_tile_walks(walk, tiles):
    """The compiled walks (wgmma with TMA weight tiles, persistent and flattened loops)
    at DeepSeek-V2-Lite's expert shape."""
    from engine.kernels.moe import MoEConfig, fused_moe_triton
    x, w13, w2, ids, w, ref = _dsv2_case()
    out = fused_moe_triton(x, w13, w2, ids, w.to(x.dtype), MoEConfig(*tiles, *walk))
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_fused_moe_gpu_fp32_skewed():
    _check(300, 64, 256, 128, 6, torch.float32, "cuda", skew=6.0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_squared_relu_experts(dtype):
    """NemotronH's experts: not gated, relu(x W_up^T)^2 W_down^T; w13 holds only the up rows."""
    g = torch.Generator().manual_seed(7)
    T, E, H, inter, k = 23, 8, 48, 40, 3
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, inter, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, inter, generator=g) / inter ** 0.5
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)
    direct = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            direct[t] += weights[t, j].double() * (torch.relu(x[t].double() @ w1[e].double().T) ** 2) @ w2[e].double().T
    ref = fused_moe_ref(x.double(), w1.double(), w2.double(), ids, weights.double(), activation="relu2")
    assert torch.allclose(ref, direct, atol=1e-10)
    to = lambda t: t.to(dtype)  # noqa: E731
    out = fused_moe(to(x), to(w1), to(w2), ids, to(weights), backend="triton", activation="relu2")
    assert out.dtype == dtype and rel_err(out, direct) < TOL[dtype]
    if dtype == torch.float32:      # TMA rows of an ungated w13 (up rows only)
        from engine.kernels.moe import MoEConfig, fused_moe_triton
        out = fused_moe_triton(x, w1, w2, ids, weights, MoEConfig(16, 16, 16, 4, 2, *WALKS["persistent-flatten-tma"]),
                               activation="relu2")
        assert rel_err(out, direct) < TOL[dtype]


@pytest.mark.gpu
def test_fused_moe_squared_relu_experts_gpu():
    g = torch.Generator().manual_seed(8)
    T, E, H, inter, k = 300, 128, 2688, 1856, 6      # Nemotron-3-Nano's experts
    x = torch.randn(T, H, generator=g).bfloat16().cuda()
    w1 = (torch.randn(E, inter, H, generator=g) / H ** 0.5).bfloat16().cuda()
    w2 = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).bfloat16().cuda()
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)
    ids, weights = ids.cuda(), weights.cuda()
    ref = fused_moe_ref(x.double(), w1.double(), w2.double(), ids, weights.double(), activation="relu2")
    out = fused_moe(x, w1, w2, ids, weights.bfloat16(), activation="relu2")
    assert rel_err(out, ref) < TOL[torch.bfloat16]
