"""The expert-parallel engine with its ranks as Ray actors in a placement group (a real
local Ray instance): the same greedy answer as one process, through a live rebalance."""

from __future__ import annotations

import os

import pytest
import ray

from cluster.ep_ranks import RayRankLauncher
from engine import LLM, EngineConfig, SamplingParams
from eplb.elastic import ElasticEPEngine
from tests.ray_cluster import local_ray

PROMPTS = ["Experts, spread out.", "a second, somewhat longer prompt for the other rank"]


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray of the test's own (tests/ray_cluster.py); two CPUs, one per rank."""
    with local_ray(num_cpus=2, runtime_env={"env_vars": {"TANDEM_CACHE": os.environ["TANDEM_CACHE"]}}):
        yield


def test_ep_ranks_as_ray_actors_in_a_placement_group(ray_instance):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = [o.outputs[0].token_ids for o in LLM("default", max_model_len=256).generate(PROMPTS, params)]
    launcher = RayRankLauncher()
    engine = ElasticEPEngine(EngineConfig(model="default", max_model_len=256), 2, launcher=launcher)
    try:
        table = ray.util.placement_group_table()
        assert [len(g["bundles"]) for g in table.values() if g["state"] == "CREATED"] == [2]
        assert [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)] == want
        engine.rebalance()
        assert engine.stats.bytes_moved_total > 0
        assert [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)] == want
    finally:
        engine.shutdown()
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
