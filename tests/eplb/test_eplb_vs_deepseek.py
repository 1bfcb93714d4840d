"""The placement the EP engine uses (global policy with swap refinement) balances
skewed loads at least as well as DeepSeek's published algorithm on the same loads.

DeepSeek's EPLB is hierarchical when expert groups divide over nodes, global otherwise,
with plain greedy (LPT) packing: `rebalance(..., refine=False)` with the default mode,
which reproduces the plan in DeepSeek's README exactly (test_eplb_policy.py).
"""

from __future__ import annotations

import pytest

from eplb import balancedness, rebalance

CASES = [(4, 1, 0), (8, 1, 16), (8, 2, 0), (8, 2, 32), (16, 2, 16), (16, 4, 32)]   # gpus, nodes, redundant


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exponent", [0.6, 1.0, 1.4])
def test_engine_policy_at_least_deepseek_on_zipf_traces(zipf_load, seed: int, exponent: float) -> None:
    experts, groups = 64, 8
    load = zipf_load(6, experts, exponent, seed, tokens=1024, topk=4)
    for gpus, nodes, redundant in CASES:
        replicas = experts + redundant
        deepseek = balancedness(load, rebalance(load, replicas, groups, nodes, gpus, refine=False), gpus)
        ours = balancedness(load, rebalance(load, replicas, groups, nodes, gpus, hierarchical=False), gpus)
        assert ours.mean() >= deepseek.mean() - 1e-12, (gpus, nodes, redundant)
        assert bool((ours >= deepseek - 1e-12).all()), (gpus, nodes, redundant, (ours - deepseek).min())
