"""The multi-rank EP engine (gloo, one process per rank) against the single-process
engine: same greedy tokens, close logprobs, with requests in flight through a forced
rebalance, a grow from 2 to 4 ranks and a shrink back to 2; with the normal MoE
dispatch and with the low-latency one (peer-mapped buffers, remapped at each regroup)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from eplb.elastic import ElasticEPEngine, EplbConfig
from tests.engine.tiny_models import build

PROMPTS = [[5, 17, 99, 3], list(range(40, 77)), [7] * 23, [200, 1, 2, 3], [9, 8, 7, 6, 5], [100, 101, 250]]
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=5)
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, folder)
    return folder, LLM(str(folder), max_logprobs=5).generate(PROMPTS, PARAMS)


def assert_matches(outs, refs) -> None:
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref.token_ids, f"prompt {ref.prompt_token_ids[:4]}..."
        for got, want in zip(out.logprobs, ref.logprobs):
            assert got.keys() == want.keys()
            assert max(abs(got[t] - want[t]) for t in want) < LOGPROB_ATOL
        assert out.finish_reason == "length"


def in_flight(eng: ElasticEPEngine, rids: list[str]) -> list[str]:
    """Requests that have produced tokens and are not finished."""
    return [r for r in rids if not eng.requests[r].finished and eng.requests[r].result.token_ids]


@pytest.mark.parametrize("dispatch", ["normal", "low_latency"])
def test_greedy_parity_through_rebalance_grow_and_shrink(family, dispatch) -> None:
    folder, refs = family
    eplb = EplbConfig(step_interval=4, auto_rebalance=False)
    # low_latency: the buffers hold max_num_batched_tokens per rank, so prompts longer
    # than 16 tokens go through chunked prefill.
    config = EngineConfig(model=str(folder), max_logprobs=5,
                          max_num_batched_tokens=16 if dispatch == "low_latency" else 2048)
    with ElasticEPEngine(config, 2, eplb=eplb, dispatch=dispatch) as eng:
        layers, experts = eng.num_moe_layers, eng.num_experts
        assert eng.slots_per_rank == experts // 2
        assert eng.slots_loaded == eng.slots_per_rank, "each rank loads only its own experts"
        rids = [eng.add_request(p, PARAMS) for p in PROMPTS[:2]]
        for _ in range(3):
            eng.step()

        # Nothing to gain on a uniform load; a skewed one moves weights.
        assert not eng.rebalance(torch.ones(layers, experts), force=False)
        assert in_flight(eng, rids)
        before = eng.phy2log.clone()
        skew = torch.arange(1, experts + 1, dtype=torch.float64).pow(3).flip(0).repeat(layers, 1)
        assert eng.rebalance(skew)
        assert not torch.equal(eng.phy2log, before)
        assert eng.stats.bytes_moved_total > 0 and eng.stats.num_rebalances == 1

        rids += [eng.add_request(p, PARAMS) for p in PROMPTS[2:4]]
        for _ in range(2):
            eng.step()
        assert in_flight(eng, rids)
        eng.scale_to(4, serve_while_loading=False)   # keep them in flight across the regroup
        assert eng.world_size == 4 and eng.phy2log.shape == (layers, 4 * eng.slots_per_rank)
        assert bool((eng.phy2log >= 0).all()), "every slot of the new ranks got an expert"
        new_ranks = {r.name for r in eng.ranks[2:]}
        rids += [eng.add_request(p, PARAMS) for p in PROMPTS[4:]]
        assert {eng.requests[r].owner for r in rids[4:]} <= new_ranks, "new ranks take new requests"
        for _ in range(3):
            eng.step()
        assert in_flight(eng, rids[4:]), "the shrink starts with requests running on the leaving ranks"

        moved = eng.stats.bytes_moved_total
        eng.scale_to(2)
        assert eng.world_size == 2 and eng.phy2log.shape == (layers, experts)
        assert eng.stats.bytes_moved_total > moved
        while eng.has_unfinished():
            eng.step()
        results = {o.request_id: o for o in eng.pop_finished()}
        assert not eng.requests, "popped results are forgotten"
        assert_matches([results[r] for r in rids], refs)
        assert [e.split(":")[1].strip() for e in eng.events] == ["2 ranks", "4 ranks", "2 ranks"]
        assert len(eng.stats.balancedness) == layers
        assert eng.stats.num_rebalances == 3
        # The engine serves on after all that, through the plain offline API too.
        assert_matches(eng.generate(PROMPTS[:2], PARAMS), refs[:2])


# NemotronH (Mamba-2 state slots, squared-ReLU experts): the Super layout dispatches the
# LatentMoE's latent vector (moe_latent_size wide, half the hidden size here), the Nano
# layout the hidden state.
HYBRID_PROMPTS = [[5, 17, 99, 3], list(range(40, 61)), [7] * 11, [200, 1, 2, 3, 4]]
HYBRID_PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module", params=["nemotron_h_super", "nemotron_h_nano"])
def hybrid(request, tmp_path_factory):
    from tests.engine.tiny_models import HYBRID_CONFIGS
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, folder)
    kwargs = HYBRID_CONFIGS[request.param][2]
    width = kwargs.get("moe_latent_size") or kwargs["hidden_size"]
    return folder, width, LLM(str(folder), max_logprobs=5).generate(HYBRID_PROMPTS, HYBRID_PARAMS)


@pytest.mark.parametrize("dispatch", ["normal", "low_latency"])
def test_nemotron_h_greedy_parity_through_rebalance(hybrid, dispatch) -> None:
    folder, width, refs = hybrid
    config = EngineConfig(model=str(folder), max_logprobs=5,
                          max_num_batched_tokens=16 if dispatch == "low_latency" else 2048)
    with ElasticEPEngine(config, 2, eplb=EplbConfig(auto_rebalance=False), dispatch=dispatch) as eng:
        layers, experts = eng.num_moe_layers, eng.num_experts
        assert eng.dispatch_width == width, "what travels is the experts' input (the latent for LatentMoE)"
        assert eng.slots_loaded == eng.slots_per_rank == experts // 2
        rids = [eng.add_request(p, HYBRID_PARAMS) for p in HYBRID_PROMPTS[:2]]
        for _ in range(3):
            eng.step()
        assert in_flight(eng, rids)
        before = eng.phy2log.clone()
        skew = torch.arange(1, experts + 1, dtype=torch.float64).pow(3).flip(0).repeat(layers, 1)
        assert eng.rebalance(skew)
        assert not torch.equal(eng.phy2log, before) and eng.stats.bytes_moved_total > 0
        rids += [eng.add_request(p, HYBRID_PARAMS) for p in HYBRID_PROMPTS[2:]]
        while eng.has_unfinished():
            eng.step()
        results = {o.request_id: o for o in eng.pop_finished()}
        assert_matches([results[r] for r in rids], refs)
