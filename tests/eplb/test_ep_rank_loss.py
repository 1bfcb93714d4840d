"""A rank process dies: the survivors serve on when their replicas cover every expert,
and the engine says clearly when they do not. Bad requests never take it down."""

from __future__ import annotations

import os
import signal

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.distributed import EPEngine, EPEngineError, RankLostError
from eplb.elastic import ElasticEPEngine, EplbConfig
from tests.engine.tiny_models import build

PROMPTS = [[5, 17, 99, 3], list(range(40, 77)), [7] * 23, [200, 1, 2, 3], [9, 8, 7, 6, 5], [100, 101]]
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=3)
NO_AUTO = EplbConfig(auto_rebalance=False)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    build("qwen3_moe", folder)
    return folder, LLM(str(folder), max_logprobs=3).generate(PROMPTS, PARAMS)


def _kill(eng: ElasticEPEngine, rank: int) -> None:
    proc = eng.ranks[rank].process
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


def test_survivors_serve_on_from_their_replicas(qwen3_moe) -> None:
    folder, refs = qwen3_moe
    # 16 slots for 8 experts on 4 ranks: slot s holds expert s % 8, so every expert
    # has copies on two different ranks.
    with ElasticEPEngine(EngineConfig(model=str(folder), max_logprobs=3), 4, num_redundant_experts=8,
                         eplb=NO_AUTO, timeout_s=60) as eng:
        rids = [eng.add_request(p, PARAMS) for p in PROMPTS]
        for _ in range(4):
            eng.step()
        lost = eng.ranks[3].name
        assert any(eng.requests[r].owner == lost for r in rids), "the lost rank had requests running"
        _kill(eng, 3)
        while eng.has_unfinished():
            eng.step()
        assert eng.world_size == 3 and eng.num_recoveries == 1
        assert any("lost" in e for e in eng.events)
        for rid, ref in zip(rids, refs):
            assert eng.requests[rid].result.token_ids == ref.token_ids
        assert [o.token_ids for o in eng.generate(PROMPTS[:2], PARAMS)] == [r.token_ids for r in refs[:2]]


def test_auto_rebalance_bad_requests_and_a_lost_sole_copy(qwen3_moe) -> None:
    folder, refs = qwen3_moe
    # Aggregate every 2 steps and take any placement that is not worse.
    auto = EplbConfig(step_interval=2, window_size=4, min_gain=0.0)
    with ElasticEPEngine(EngineConfig(model=str(folder), max_logprobs=3), 2, eplb=auto, timeout_s=60) as eng:
        with pytest.raises(ValueError, match=r"prompt 1: .*token ids must be (integers )?in \[0, 256\)"):
            eng.generate([[1, 2], [999]], PARAMS)
        with pytest.raises(ValueError, match="non-empty list of token ids"):
            eng.add_request([], PARAMS)
        assert [o.token_ids for o in eng.generate(PROMPTS[:3], PARAMS)] == [r.token_ids for r in refs[:3]]
        assert eng.stats.num_rebalances >= 1 and eng.stats.bytes_moved_total > 0
        assert len(eng.stats.balancedness) == eng.num_moe_layers

        eng.add_request(PROMPTS[1], PARAMS)
        eng.step()
        _kill(eng, 1)
        with pytest.raises(RankLostError, match=r"only copies of MoE layer 0: experts \[\d"):
            while eng.has_unfinished():
                eng.step()
        with pytest.raises(RankLostError):
            eng.add_request(PROMPTS[0], PARAMS)


class FailOnStep:
    """A worker extension that makes rank 1 fail step 3 on its own (no dead process)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def before_step(self, msg, payload) -> None:
        if msg.step == 3 and self.worker.ep.rank == 1:
            raise RuntimeError("injected failure")


def test_a_rank_failing_a_step_stops_the_engine_with_a_clear_error(qwen3_moe) -> None:
    folder, _ = qwen3_moe
    with EPEngine(EngineConfig(model=str(folder)), 2, extensions=(f"{__name__}:FailOnStep",), timeout_s=10) as eng:
        eng.add_request(PROMPTS[0], PARAMS)
        with pytest.raises(EPEngineError, match="rank-1 failed step 3 .*injected failure.*restart the engine"):
            while eng.has_unfinished():
                eng.step()
        with pytest.raises(EPEngineError):
            eng.step()


class DieWhenMigrating:
    """A worker extension: rank 3 exits abruptly when its first weight migration starts
    (it reads EPLB's commands: same name)."""
    name = "eplb"

    def __init__(self, worker) -> None:
        self.worker = worker

    def before_step(self, msg, payload) -> None:
        if self.worker.ep.rank == 3 and (payload or {}).get("migrate_layer") is not None:
            os._exit(1)


def test_a_rank_lost_while_growing_interrupts_the_scale_not_the_requests(qwen3_moe) -> None:
    from eplb.elastic import ScaleInterrupted
    folder, refs = qwen3_moe
    with ElasticEPEngine(EngineConfig(model=str(folder), max_logprobs=3), 2, eplb=NO_AUTO, timeout_s=60,
                         extensions=(f"{__name__}:DieWhenMigrating",)) as eng:
        rids = [eng.add_request(p, PARAMS) for p in PROMPTS[:4]]
        for _ in range(2):
            eng.step()
        with pytest.raises(ScaleInterrupted, match="serves on 3 ranks"):
            eng.scale_to(4, serve_while_loading=False)
        while eng.has_unfinished():
            eng.step()
        assert eng.world_size == 3 and eng.num_recoveries == 1
        for rid, ref in zip(rids, refs):
            assert eng.requests[rid].result.token_ids == ref.token_ids
        eng.rebalance()        # fills the slots the lost rank's migration left empty
        assert bool((eng.phy2log >= 0).all())
        assert [o.token_ids for o in eng.generate(PROMPTS[4:], PARAMS)] == [r.token_ids for r in refs[4:]]
