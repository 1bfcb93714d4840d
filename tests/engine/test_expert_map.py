"""The one expert-map type: log2phy and logcnt derived from phy2log, empty slots never
routed to, and the MoE layer taking a map only when every expert has a slot."""

from __future__ import annotations

import pytest
import torch

from engine.layers.expert_map import ExpertMap
from engine.layers.moe import FusedMoE


def test_derivation_with_empty_slots() -> None:
    m = ExpertMap.from_phy2log([[2, -1, 0, 1, 2, -1], [0, 1, 2, 0, 0, 1]], 3)
    assert m.logcnt.tolist() == [[1, 1, 2], [3, 2, 1]]
    assert m.log2phy.tolist() == [[[2, -1, -1], [3, -1, -1], [0, 4, -1]],
                                  [[0, 3, 4], [1, 5, -1], [2, -1, -1]]]
    assert (m.num_layers, m.num_slots, m.num_logical) == (2, 6, 3)
    assert m.missing() == {}
    assert ExpertMap.from_phy2log([[0, 1]], 2, width=4).log2phy.shape == (1, 2, 4)


def test_every_slot_of_an_expert_is_listed_once() -> None:
    gen = torch.Generator().manual_seed(0)
    phy2log = torch.randint(-1, 5, (4, 24), generator=gen)
    m = ExpertMap.from_phy2log(phy2log, 5)
    for layer in range(4):
        for e in range(5):
            slots = m.log2phy[layer, e, :m.logcnt[layer, e]].tolist()
            assert slots == (phy2log[layer] == e).nonzero().flatten().tolist()
            assert (m.log2phy[layer, e, m.logcnt[layer, e]:] == -1).all()


def test_missing_experts_and_bad_ids() -> None:
    m = ExpertMap.from_phy2log([[0, 1, 2, 3], [0, 2, -1, -1]], 4)
    assert m.missing() == {1: [1, 3]}
    with pytest.raises(ValueError, match=r"experts \[1, 3\] have no slot in MoE layer 1"):
        m.check_routable()
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        ExpertMap.from_phy2log([[0, 4]], 4)
    with pytest.raises(ValueError, match="2-D"):
        ExpertMap.from_phy2log([0, 1], 2)


def test_layer_edits_and_resizing() -> None:
    m = ExpertMap.initial(2, 6, 4)
    assert m.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert m.with_layer(1, [3, 2, 1, 0, 3, 2]).phy2log[1].tolist() == [3, 2, 1, 0, 3, 2]
    assert m.layer(1).phy2log.tolist() == [[0, 1, 2, 3, 0, 1]]
    grown = m.resized(8)
    assert grown.phy2log[0].tolist() == [0, 1, 2, 3, 0, 1, -1, -1] and grown.logcnt[0].tolist() == [2, 2, 1, 1]
    assert grown.resized(4) == ExpertMap.initial(2, 4, 4)
    assert m.slots(2, 2).tolist() == [[2, 3], [2, 3]]


def test_moe_layer_swaps_maps_in_place_and_refuses_unroutable_ones() -> None:
    moe = FusedMoE(3, 8, 4, num_physical=5)
    moe.set_expert_map(ExpertMap.from_phy2log([[2, 0, 1, 2, -1]], 3))
    log2phy = moe.log2phy
    moe.set_expert_map(ExpertMap.from_phy2log([[0, 1, 2, 0, 0]], 3))
    assert moe.log2phy is log2phy, "same slot count: written in place (CUDA graphs read it there)"
    assert moe.log2phy.tolist() == [[0, 3, 4], [1, -1, -1], [2, -1, -1]]
    assert moe.expert_map() == ExpertMap.from_phy2log([[0, 1, 2, 0, 0]], 3)
    with pytest.raises(ValueError, match=r"experts \[1\] have no slot"):
        moe.set_expert_map(ExpertMap.from_phy2log([[0, 2, -1, 0, 2]], 3))
    with pytest.raises(ValueError, match="one layer of 3 experts"):
        moe.set_expert_map(ExpertMap.initial(2, 5, 3))
