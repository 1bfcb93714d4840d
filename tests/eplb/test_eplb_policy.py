import pytest
import torch
from torch import Tensor

from eplb import Placement, gpu_loads, rebalance
from eplb.packing import balanced_packing
from eplb.policy import replicate_experts

README_LOAD = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ],
    dtype=torch.float32,
)


def assert_valid(p: Placement, load: Tensor, num_replicas: int) -> None:
    """The invariants every placement must satisfy, whatever the policy."""
    layers, experts = load.shape
    assert p.phy2log.shape == (layers, num_replicas)
    assert p.logcnt.shape == (layers, experts)
    assert p.log2phy.shape[:2] == (layers, experts)
    for t in (p.phy2log, p.log2phy, p.logcnt):
        assert t.dtype == torch.int64
    assert (p.logcnt >= 1).all(), "a logical expert has no slot"
    assert (p.logcnt.sum(1) == num_replicas).all()
    counted = torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(1, p.phy2log, torch.ones_like(p.phy2log))
    assert torch.equal(counted, p.logcnt)
    # log2phy: the first logcnt entries are real slots, the rest -1 padding.
    valid = torch.arange(p.log2phy.shape[2]) < p.logcnt.unsqueeze(-1)
    assert torch.equal(p.log2phy >= 0, valid)
    assert (p.log2phy[~valid] == -1).all()
    assert p.log2phy.shape[2] == p.logcnt.max()
    assert (p.log2phy[..., 1:] > p.log2phy[..., :-1])[valid[..., 1:]].all(), "copies not in slot order"
    # Each slot listed exactly once, under the expert that phy2log says it holds.
    slots = p.log2phy.clamp(min=0).flatten(1)
    owner = torch.arange(experts).repeat_interleave(p.log2phy.shape[2]).expand(layers, -1)
    assert torch.equal(p.phy2log.gather(1, slots)[valid.flatten(1)], owner[valid.flatten(1)])
    listed = p.log2phy.flatten(1)[valid.flatten(1)].view(layers, num_replicas)
    assert torch.equal(listed.sort(1).values, torch.arange(num_replicas).expand(layers, -1))


def assert_groups_stay_on_nodes(p: Placement, num_groups: int, num_nodes: int) -> None:
    layers, experts = p.logcnt.shape
    node_of_slot = torch.arange(p.num_slots) // (p.num_slots // num_nodes)
    group_of_slot = p.phy2log // (experts // num_groups)
    for layer in range(layers):
        pairs = {(int(g), int(n)) for g, n in zip(group_of_slot[layer], node_of_slot)}
        assert len(pairs) == num_groups, "an expert group is split across nodes"
        per_node = torch.bincount(torch.tensor([n for _, n in pairs]), minlength=num_nodes)
        assert (per_node == num_groups // num_nodes).all()


# (experts, groups, nodes, gpus, redundant)
SHAPES = [
    (12, 4, 2, 8, 4),
    (16, 4, 4, 4, 0),
    (32, 8, 2, 8, 32),
    (64, 8, 4, 16, 16),
    (64, 4, 1, 8, 8),
    (48, 6, 3, 6, 6),
    (256, 8, 8, 64, 64),
    (10, 1, 1, 1, 7),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("experts,groups,nodes,gpus,redundant", SHAPES)
def test_invariants_on_random_loads(seed: int, experts: int, groups: int, nodes: int, gpus: int, redundant: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    load = torch.rand(5, experts, generator=gen) ** 3 * 1000
    load[0] = 0.0  # a layer without traffic
    load[1] = load[1].round()  # integer counts, with ties
    replicas = experts + redundant
    for hierarchical in (None, False):
        p = rebalance(load, replicas, groups, nodes, gpus, hierarchical=hierarchical)
        assert_valid(p, load, replicas)
        if hierarchical is None:
            assert_groups_stay_on_nodes(p, groups, nodes)
        # Deterministic: same load, same placement.
        again = rebalance(load.clone(), replicas, groups, nodes, gpus, hierarchical=hierarchical)
        assert torch.equal(p.phy2log, again.phy2log)


def test_matches_published_deepseek_example() -> None:
    # Plain greedy packing reproduces DeepSeek's README plan exactly; the swap pass
    # finds nothing better on this input and leaves it alone.
    expected = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    for refine in (False, True):
        assert rebalance(README_LOAD, 16, 4, 2, 8, refine=refine).phy2log.tolist() == expected


def _greedy_counts(weight: Tensor, num_phy: int) -> Tensor:
    """Reference water-filling: one slot at a time to the highest load per copy."""
    cnt = torch.ones_like(weight, dtype=torch.int64)
    for _ in range(num_phy - weight.shape[1]):
        cnt[torch.arange(weight.shape[0]), (weight / cnt).argmax(1)] += 1
    return cnt


@pytest.mark.parametrize("seed", range(20))
def test_replication_matches_slot_by_slot_water_filling(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    experts = int(torch.randint(1, 40, (), generator=gen))
    extra = int(torch.randint(0, 90, (), generator=gen))
    weight = torch.rand(3, experts, generator=gen, dtype=torch.float64) * 100
    phy2log, logcnt = replicate_experts(weight, experts + extra)
    assert torch.equal(logcnt, _greedy_counts(weight, experts + extra))
    assert torch.equal(phy2log[:, :experts], torch.arange(experts).expand(3, -1))
    # With ties the choice may differ, the optimum (max load per copy) may not.
    ties = weight.round()
    _, tied_cnt = replicate_experts(ties, experts + extra)
    assert torch.equal((ties / tied_cnt).amax(1), (ties / _greedy_counts(ties, experts + extra)).amax(1))


def test_replication_without_load_spreads_copies() -> None:
    _, logcnt = replicate_experts(torch.zeros(2, 8, dtype=torch.float64), 8 + 11)
    assert logcnt.max() == 3 and logcnt.min() == 2


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("items,packs", [(12, 4), (40, 8), (64, 4), (9, 3), (6, 6), (7, 1)])
def test_packing_fills_packs_equally_and_swaps_only_help(seed: int, items: int, packs: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(4, items, generator=gen, dtype=torch.float64) ** 4
    per_pack = items // packs
    loads = []
    for refine in (False, True):
        pack, rank = balanced_packing(weight, packs, refine)
        assert (torch.zeros(4, packs, dtype=torch.int64).scatter_add_(1, pack, torch.ones_like(pack)) == per_pack).all()
        assert (rank >= 0).all() and (rank < per_pack).all()
        assert ((pack * per_pack + rank).sort(1).values == torch.arange(items)).all()
        loads.append(torch.zeros(4, packs, dtype=torch.float64).scatter_add_(1, pack, weight).amax(1))
    assert (loads[1] <= loads[0] + 1e-12).all()


def test_packing_rejects_uneven_split() -> None:
    with pytest.raises(ValueError, match="10 items do not split into 4 packs"):
        balanced_packing(torch.ones(1, 10), 4)


def test_swaps_reach_optimum_where_greedy_misses_it() -> None:
    # Greedy: 4->A, 2->B, 2->B, 2->A, 1->B (B full), 1->A: {4,2,1}=7 vs {2,2,1}=5.
    # The optimum {4,1,1} | {2,2,2} is one swap away.
    weight = torch.tensor([[4.0, 2.0, 2.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    plain, _ = balanced_packing(weight, 2, refine=False)
    tuned, _ = balanced_packing(weight, 2, refine=True)

    def peak(pack: Tensor) -> float:
        return float(torch.zeros(1, 2, dtype=torch.float64).scatter_add_(1, pack, weight).max())

    assert peak(plain) == 7.0
    assert peak(tuned) == 6.0


def test_no_redundancy_is_a_permutation() -> None:
    load = torch.rand(4, 32, generator=torch.Generator().manual_seed(0))
    for hierarchical in (None, False):
        p = rebalance(load, 32, 4, 2, 8, hierarchical=hierarchical)
        assert (p.logcnt == 1).all() and p.log2phy.shape[2] == 1
        assert torch.equal(p.phy2log.sort(1).values, torch.arange(32).expand(4, -1))


def test_one_gpu_takes_everything() -> None:
    load = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    p = rebalance(load, 20, 4, 1, 1)
    assert_valid(p, load, 20)
    assert torch.allclose(gpu_loads(load, p, 1).squeeze(1), load.double().sum(1))


def test_auto_picks_hierarchical_only_when_groups_fit_nodes() -> None:
    load = torch.rand(2, 24, generator=torch.Generator().manual_seed(2)) * 100
    as_global = rebalance(load, 36, 1, 1, 6)
    # 6 groups over 4 nodes do not nest: auto falls back to global.
    assert torch.equal(rebalance(load, 36, 6, 4, 12).phy2log, rebalance(load, 36, 1, 1, 12).phy2log)
    # 6 groups over 3 nodes nest: auto is hierarchical, False forces global.
    hier = rebalance(load, 36, 6, 3, 6)
    assert_groups_stay_on_nodes(hier, 6, 3)
    assert torch.equal(rebalance(load, 36, 6, 3, 6, hierarchical=False).phy2log, as_global.phy2log)
    assert torch.equal(rebalance(load, 36, 6, 3, 6, hierarchical=True).phy2log, hier.phy2log)


def test_load_dtypes_are_accepted() -> None:
    counts = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(3))
    ref = rebalance(counts.double(), 24, 4, 2, 8).phy2log
    assert torch.equal(rebalance(counts, 24, 4, 2, 8).phy2log, ref)
    assert torch.equal(rebalance(counts.float(), 24, 4, 2, 8).phy2log, ref)
    assert_valid(rebalance(counts.bfloat16(), 24, 4, 2, 8), counts, 24)


def test_non_contiguous_load_and_numpy_ints() -> None:
    load = torch.rand(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = rebalance(load.t().contiguous(), 24, 4, 2, 8).phy2log
    assert torch.equal(rebalance(load.t(), 24, 4, 2, 8).phy2log, ref)
    np = pytest.importorskip("numpy")
    assert torch.equal(rebalance(load.t(), *np.array([24, 4, 2, 8])).phy2log, ref)


@pytest.mark.parametrize(
    "shape,args,kwargs,message",
    [
        ((2, 16), (20, 4, 2, 8), {}, r"num_replicas \(20\) must be a multiple of num_gpus \(8\).*use 24"),
        ((2, 16), (8, 4, 2, 8), {}, r"num_replicas \(8\) is smaller than the number of logical experts \(16\)"),
        ((2, 16), (24, 4, 3, 8), {}, r"num_gpus \(8\) must be a multiple of num_nodes \(3\)"),
        ((2, 16), (24, 3, 2, 8), {}, r"num_groups \(3\) must divide the number of logical experts \(16\)"),
        ((2, 16), (24, 4, 8, 8), {"hierarchical": True}, r"hierarchical placement needs num_groups \(4\)"),
        ((2, 16), (0, 4, 2, 8), {}, r"num_replicas must be a positive int, got 0"),
        ((2, 16), (24, 4, 2, -8), {}, r"num_gpus must be a positive int, got -8"),
        ((2, 16), (24.0, 4, 2, 8), {}, r"num_replicas must be a positive int, got 24.0"),
        ((2, 16), (24, True, 2, 8), {}, r"num_groups must be a positive int, got True"),
        ((16,), (24, 4, 2, 8), {}, r"load must be a non-empty 2-D tensor .* got \(16,\)"),
        ((2, 0), (24, 4, 2, 8), {}, r"non-empty 2-D"),
    ],
)
def test_bad_arguments_raise_clear_errors(shape, args, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        rebalance(torch.ones(shape), *args, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_load_values_raise(bad: float) -> None:
    load = torch.ones(2, 16)
    load[1, 3] = bad
    with pytest.raises(ValueError, match="finite and non-negative"):
        rebalance(load, 16, 1, 1, 4)


def test_non_tensor_and_bool_load_raise() -> None:
    with pytest.raises(ValueError, match="got list"):
        rebalance([[1.0, 2.0]], 2, 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="real numbers"):
        rebalance(torch.ones(2, 4, dtype=torch.bool), 4, 1, 1, 1)
