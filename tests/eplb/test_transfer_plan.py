"""Migration plans and target placements: pure functions, no processes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from eplb.planner import measured_balancedness, placement_balancedness, target_placement
from eplb.transfer_plan import plan_layer, preserve_slots


def _per_rank(row: list[int], slots: int) -> list[Counter]:
    return [Counter(row[i:i + slots]) for i in range(0, len(row), slots)]


def _apply(old: list[int], new: list[int], slots: int) -> list[int]:
    """Simulate a plan: every destination slot takes its source slot's old expert."""
    got = list(old)
    for t in plan_layer(old, new, slots):
        assert old[t.src_rank * slots + t.src_slot] == t.expert, "a source must hold the expert"
        got[t.dst_rank * slots + t.dst_slot] = old[t.src_rank * slots + t.src_slot]
    return got


def test_preserve_slots_keeps_each_ranks_experts_and_their_old_slots() -> None:
    old = [0, 1, 2, 3, 4, 5, 6, 7]
    new = [3, 9, 0, 1, 7, 4, 8, 5]            # rank 0 keeps 0, 1, 3; rank 1 keeps 4, 5, 7
    out = preserve_slots(old, new, 4)
    assert _per_rank(out, 4) == _per_rank(new, 4)
    assert out == [0, 1, 9, 3, 4, 5, 8, 7]
    assert sum(o != n for o, n in zip(old, out)) == 2   # only the two new experts move


@pytest.mark.parametrize("seed", range(20))
def test_plans_reach_the_new_map_with_minimal_moves(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    slots, ranks, experts = 3, 4, 7
    old = torch.randperm(12, generator=g).remainder(experts).tolist()
    for e in range(experts):           # every expert has a copy somewhere
        if e not in old:
            old[e] = e
    new = preserve_slots(old, torch.randint(0, experts, (ranks * slots,), generator=g).tolist(), slots)
    plan = plan_layer(old, new, slots)
    assert _apply(old, new, slots) == new
    assert len(plan) == sum(o != n for o, n in zip(old, new))
    for t in plan:    # an expert this rank already holds is copied locally, never sent
        if not t.is_local:
            assert t.expert not in old[t.dst_rank * slots:(t.dst_rank + 1) * slots]


def test_new_replicas_of_one_expert_come_from_different_holders() -> None:
    old = [5, 0, 5, 1, 2, 3, 4, 6]             # expert 5 on ranks 0 and 1 (2 slots each)
    new = [5, 0, 5, 1, 5, 3, 5, 6]             # ranks 2 and 3 need it too
    senders = [t.src_rank for t in plan_layer(old, new, 2) if t.expert == 5]
    assert sorted(senders) == [0, 1]


def test_joining_and_leaving_slots() -> None:
    grow_old = [0, 1, 2, 3, -1, -1, -1, -1]     # ranks 2, 3 joined without weights
    grow_new = [0, 1, 2, 3, 0, 2, 1, 3]
    assert _apply(grow_old, grow_new, 2) == grow_new
    shrink_new = [0, 1, 2, 3, -1, -1, -1, -1]   # ranks 2, 3 leave: nothing is sent to them
    assert plan_layer(grow_new, shrink_new, 2) == []
    with pytest.raises(ValueError, match="expert 4 has no copy"):
        plan_layer([0, 1, 2, 3], [0, 1, 2, 4], 2)


def test_target_placement_pads_for_leaving_ranks_and_balances() -> None:
    load = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 80]])
    current = torch.arange(8).repeat(2, 2)                     # 4 ranks x 4 slots
    shrunk = target_placement(load, 2, 4, current)
    assert shrunk.shape == (2, 16) and bool((shrunk[:, 8:] == -1).all())
    assert bool((shrunk[:, :8] >= 0).all())
    grown = target_placement(load, 4, 4, current)
    for layer, hot in ((0, 0), (1, 7)):    # the hot expert gets the redundant slots
        assert int((grown[layer] == hot).sum()) >= 4
    assert placement_balancedness(load, grown, 4).min() > placement_balancedness(load, current, 4).max()


def test_measured_balancedness_from_slot_counts() -> None:
    counts = torch.tensor([[4, 4, 2, 6], [0, 0, 0, 0]])       # 2 ranks x 2 slots
    assert measured_balancedness(counts, 2) == [1.0, 1.0]
    assert measured_balancedness(torch.tensor([[6, 0, 1, 1]]), 2) == [pytest.approx(8 / 2 / 6)]
