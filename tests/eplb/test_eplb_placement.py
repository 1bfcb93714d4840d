import dataclasses

import pytest
import torch

from eplb import Placement, balancedness, contiguous_placement, gpu_loads, rebalance


def test_from_phy2log_derives_consistent_maps() -> None:
    phy2log = torch.tensor([[2, 0, 2, 1, 2, 3], [0, 1, 2, 3, 1, 0]])
    p = Placement.from_phy2log(phy2log, num_logical=4)
    assert p.logcnt.tolist() == [[1, 1, 3, 1], [2, 2, 1, 1]]
    assert p.log2phy.tolist() == [
        [[1, -1, -1], [3, -1, -1], [0, 2, 4], [5, -1, -1]],
        [[0, 5, -1], [1, 4, -1], [2, -1, -1], [3, -1, -1]],
    ]
    assert p.phy2log.dtype == p.log2phy.dtype == p.logcnt.dtype == torch.int64
    assert (p.num_layers, p.num_slots, p.num_logical) == (2, 6, 4)


def test_from_phy2log_rejects_unknown_experts() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        Placement.from_phy2log(torch.tensor([[0, 1, 2, 4]]), num_logical=4)
    with pytest.raises(ValueError, match="2-D"):
        Placement.from_phy2log(torch.tensor([0, 1, 2, 3]), num_logical=4)


def test_placement_is_frozen() -> None:
    p = contiguous_placement(1, 4, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.phy2log = torch.zeros(1, 4, dtype=torch.int64)  # type: ignore[misc]


def test_gpu_loads_split_expert_load_over_copies() -> None:
    # GPU 0 holds experts 0 and 1, GPU 1 experts 0 (second copy) and 2.
    p = Placement.from_phy2log(torch.tensor([[0, 1, 0, 2]]), num_logical=3)
    load = torch.tensor([[10.0, 3.0, 4.0]])
    assert gpu_loads(load, p, 2).tolist() == [[8.0, 9.0]]
    assert balancedness(load, p, 2).tolist() == pytest.approx([8.5 / 9.0])


def test_balancedness_of_published_deepseek_example() -> None:
    # DeepSeek EPLB README: its plan gives GPU loads 121.5 ... 156 in layer 0.
    load = torch.tensor(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ],
        dtype=torch.float32,
    )
    phy2log = torch.tensor(
        [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    )
    plan = Placement.from_phy2log(phy2log, 12)
    assert gpu_loads(load, plan, 8)[0].tolist() == [121.5, 86.5, 125, 113, 147.5, 131.5, 156, 152]
    assert balancedness(load, plan, 8).tolist() == pytest.approx([1033 / 8 / 156, 1156 / 8 / 179.5])


def test_balancedness_edge_values() -> None:
    p = contiguous_placement(2, 8, 4)
    assert balancedness(torch.zeros(2, 8), p, 4).tolist() == [1.0, 1.0]
    assert balancedness(torch.ones(2, 8), p, 4).tolist() == [1.0, 1.0]
    one_hot = torch.zeros(2, 8)
    one_hot[:, 5] = 7.0
    assert balancedness(one_hot, p, 4).tolist() == pytest.approx([0.25, 0.25])


def test_balancedness_rejects_mismatched_inputs() -> None:
    p = contiguous_placement(2, 8, 4)
    with pytest.raises(ValueError, match=r"load has shape \(2, 6\)"):
        balancedness(torch.ones(2, 6), p, 4)
    with pytest.raises(ValueError, match="do not split evenly over 3 GPUs"):
        balancedness(torch.ones(2, 8), p, 3)


def test_contiguous_placement_layout() -> None:
    p = contiguous_placement(3, 8, 4)
    assert p.phy2log.tolist() == [list(range(8))] * 3
    assert (p.logcnt == 1).all()
    assert p.log2phy.squeeze(-1).tolist() == [list(range(8))] * 3
    with pytest.raises(ValueError, match="do not split evenly over 3 GPUs"):
        contiguous_placement(1, 8, 3)
    with pytest.raises(ValueError, match="must be positive"):
        contiguous_placement(0, 8, 4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("exponent", [0.8, 1.2])
def test_rebalancing_beats_baseline_on_zipf_load(zipf_load, seed: int, exponent: float) -> None:
    load = zipf_load(layers=6, experts=64, exponent=exponent, seed=seed)
    gpus = 8
    base = balancedness(load, contiguous_placement(6, 64, gpus), gpus)
    no_redundancy = balancedness(load, rebalance(load, 64, 8, 2, gpus), gpus)
    redundant = balancedness(load, rebalance(load, 96, 8, 1, gpus), gpus)
    # Skewed load piles onto the GPU holding the hot experts.
    assert base.mean() < 0.75
    # Moving experts alone helps every layer; the hottest expert caps it.
    assert (no_redundancy >= base).all()
    assert no_redundancy.mean() > base.mean() + 0.1
    # With 32 redundant slots the hot experts are split and GPUs end up almost even.
    assert redundant.min() > 0.97
    assert (redundant >= no_redundancy - 1e-9).all()


def test_more_redundancy_never_hurts_on_zipf_load(zipf_load) -> None:
    load = zipf_load(layers=6, experts=64, exponent=1.0, seed=7)
    means = [balancedness(load, rebalance(load, 64 + extra, 1, 1, 8), 8).mean().item() for extra in (0, 16, 32, 64)]
    assert means == sorted(means)
    assert means[-1] > 0.99


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exponent", [0.5, 0.8, 1.2])
@pytest.mark.parametrize("redundant", [0, 8, 16])
def test_global_packing_is_near_its_lower_bound(zipf_load, seed: int, exponent: float, redundant: int) -> None:
    # Given the replica counts, no packing of k copies per GPU beats the mean GPU
    # load, nor the heaviest copy plus the k-1 lightest other copies.
    load = zipf_load(layers=6, experts=64, exponent=exponent, seed=seed).double()
    p = rebalance(load, 64 + redundant, 1, 1, 8)
    k = p.num_slots // 8
    copies = (load / p.logcnt).gather(1, p.phy2log).sort(1).values
    bound = torch.maximum(load.sum(1) / 8, copies[:, -1] + copies[:, : k - 1].sum(1))
    assert (gpu_loads(load, p, 8).amax(1) <= bound * 1.006).all()
