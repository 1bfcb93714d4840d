"""Elastic EP while serving (tiny Qwen3-MoE, gloo): a forced rebalance and 2 -> 4 -> 2
under a steady stream of requests; requests on retiring ranks move instead of being
waited for; bad sizes, a failed start and a concurrent scale leave the running group
untouched; prompt logprobs through the ranks; the EPLB metrics of that run; through
AsyncEngine, requests sent and aborted while new ranks are slow to start are served
and freed before the scale ends."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.async_engine import AsyncEngine
from engine.distributed import EPEngineError
from engine.distributed.ep_worker import worker_main
from engine.distributed.launcher import SpawnLauncher
from eplb.elastic import ElasticEPEngine, EplbConfig, ScaleInProgress
from tests.engine.tiny_models import build

PROMPTS = [[5, 17, 99, 3], list(range(40, 77)), [7] * 23, [200, 1, 2, 3], [9, 8, 7, 6, 5], [100, 101, 250],
           [11, 12, 13], list(range(120, 140))]
PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    build("qwen3_moe", folder)
    refs = LLM(str(folder), max_logprobs=3).generate(PROMPTS, PARAMS)
    return folder, [r.token_ids for r in refs]


class FailingLauncher(SpawnLauncher):
    """Starts ranks that exit at once (a start that fails)."""

    def launch(self, names, address, threads):
        if not getattr(self, "fail", False):
            return super().launch(names, address, threads)
        procs = [self._mp.Process(target=_exit_now, daemon=True) for _ in names]
        for p in procs:
            p.start()
        return procs


def _exit_now() -> None:
    raise SystemExit(3)


class GatedLauncher(SpawnLauncher):
    """Starts ranks that wait for `gate` before they start (new ranks slow to load)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = self._mp.Event()
        self.gate.set()

    def launch(self, names, address, threads):
        procs = [self._mp.Process(target=_start_when_open, args=(self.gate, address, name, threads, os.getpid()),
                                  daemon=True) for name in names]
        for p in procs:
            p.start()
        return procs


def _start_when_open(gate, address: str, name: str, threads: int, parent: int) -> None:
    gate.wait(300)
    worker_main(address, name, threads, parent)


def test_scale_and_rebalance_under_a_steady_stream(qwen3_moe) -> None:
    folder, refs = qwen3_moe
    launcher = FailingLauncher()
    metrics: list[tuple] = []
    config = EngineConfig(model=str(folder), max_logprobs=3)
    with ElasticEPEngine(config, 2, eplb=EplbConfig(step_interval=3, auto_rebalance=False), timeout_s=60,
                         launcher=launcher) as eng:
        eng.stats.subscribe(lambda kind, name, value, labels: metrics.append((name, value, labels)))
        queue = list(range(len(PROMPTS))) * 2      # a steady stream: each prompt twice
        rids: dict[str, int] = {}

        def feed(n: int = 1) -> None:
            for _ in range(min(n, len(queue))):
                i = queue.pop(0)
                rids[eng.add_request(PROMPTS[i], PARAMS)] = i

        feed(4)
        for _ in range(3):
            eng.step()
            feed()

        # Bad sizes and a failed start: a clear error, the running group untouched.
        for bad in (0, -1, 1.5):
            with pytest.raises(ValueError, match="integer >= 1"):
                eng.scale_to(bad)
        with pytest.raises(ValueError, match=r"1 ranks of 4 expert slots cannot hold 8 experts; scale to at least 2"):
            eng.scale_to(1)
        launcher.fail = True
        with pytest.raises(EPEngineError, match="did not start"):
            eng.scale_to(4)
        launcher.fail = False
        assert eng.world_size == 2 and eng.failed is None and eng.events[-1].endswith("2 ranks")

        # A scale while another runs is refused, not queued.
        entered, release = threading.Event(), threading.Event()
        original = eng.scaler._grow

        def slow_grow(*args):
            entered.set()
            release.wait(60)
            return original(*args)
        eng.scaler._grow = slow_grow
        sunk: list = []
        eng.output_sink = sunk.append        # as AsyncEngine sets it: the scale's own steps stream at once
        worker = threading.Thread(target=eng.scale_to, args=(4,), kwargs={"serve_while_loading": False})
        worker.start()
        assert entered.wait(60)
        with pytest.raises(ScaleInProgress):
            eng.scale_to(2)
        with pytest.raises(ScaleInProgress):
            eng.rebalance()
        release.set()
        worker.join(300)
        eng.scaler._grow = original
        eng.output_sink = None
        assert eng.world_size == 4 and bool((eng.phy2log >= 0).all())
        assert sunk and {o.request_id for o in sunk} <= set(rids), "the migration's steps made tokens, handed out"
        later = eng.step()
        assert not {id(o) for o in later} & {id(o) for o in sunk}, "handed out once"

        for _ in range(3):
            eng.step()
            feed()
        # A forced rebalance on a skewed load while requests run.
        layers, experts = eng.num_moe_layers, eng.num_experts
        skew = torch.arange(1, experts + 1, dtype=torch.float64).pow(3).flip(0).repeat(layers, 1)
        before = eng.phy2log.clone()
        assert eng.rebalance(skew, wait=False)
        while eng.migrating:
            eng.step()
            feed()
        assert not torch.equal(eng.phy2log, before)

        # Shrink with requests running on the leaving ranks: they move, nobody waits.
        for _ in range(2):
            eng.step()
        leaving = {r.name for r in eng.ranks[2:]}
        on_leaving = [rid for rid, t in eng.requests.items() if not t.finished and t.owner in leaving]
        assert on_leaving, "the shrink starts with requests running on the leaving ranks"
        steps = eng.step_index
        eng.scale_to(2)
        assert eng.world_size == 2 and eng.phy2log.shape == (layers, 2 * eng.slots_per_rank)
        assert all(eng.requests[r].finished or eng.requests[r].owner not in leaving for r in on_leaving)
        assert eng.step_index - steps <= layers + 1, "the shrink took only the migration's steps"

        while eng.has_unfinished() or queue:
            eng.step()
            feed()
        results = {o.request_id: o.token_ids for o in eng.pop_finished()}
        assert len(results) == 2 * len(PROMPTS), "no request lost"
        for rid, i in rids.items():
            assert results[rid] == refs[i], f"prompt {i}"
        eng.step()
        stats = eng.engine_stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0), "block pools full again"
        assert [e.split(":")[1].strip() for e in eng.events if e.startswith("generation")] == \
            ["2 ranks", "4 ranks", "2 ranks"]

    names = {name for name, _, _ in metrics}
    assert {"tandem_eplb_rebalances_total", "tandem_eplb_bytes_moved_total", "tandem_eplb_rebalance_seconds",
            "tandem_eplb_balancedness", "tandem_eplb_rank_load", "tandem_eplb_rank_load_ratio",
            "tandem_eplb_step_hiccup_seconds"} <= names
    assert eng.stats.num_rebalances >= 2      # the forced one and the shrink's (the grow's if it moved any)
    ranks_seen = {labels["rank"] for name, _, labels in metrics if name == "tandem_eplb_rank_load"}
    assert ranks_seen == {"0", "1", "2", "3"}, "the load window was reported per rank at 4 ranks"


def test_prompt_logprobs_through_the_ranks(qwen3_moe) -> None:
    folder, _ = qwen3_moe
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    ref = LLM(str(folder), max_logprobs=3).generate(PROMPTS[:3], params)
    with LLM(str(folder), max_logprobs=3, data_parallel_size=2, enable_expert_parallel=True) as llm:
        outs = llm.generate(PROMPTS[:3], params)
    for out, want in zip(outs, ref):
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(want.prompt_logprobs)
        for got, exp in zip(out.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert got.keys() == exp.keys()
            assert max(abs(got[t] - exp[t]) for t in exp) < 1e-4


def test_requests_sent_and_aborted_during_a_slow_grow_are_served_at_once(qwen3_moe) -> None:
    folder, refs = qwen3_moe
    launcher = GatedLauncher()
    client = ElasticEPEngine(EngineConfig(model=str(folder), max_logprobs=3), 2,
                             eplb=EplbConfig(auto_rebalance=False), timeout_s=60, launcher=launcher)
    eng = AsyncEngine(engine_client=client)

    async def answer(i: int, rid: str, first: asyncio.Event | None = None) -> list[int]:
        ids: list[int] = []
        async for delta in eng.generate(PROMPTS[i], PARAMS, rid):
            ids.extend(delta.new_token_ids)
            if first is not None:
                first.set()
        return ids

    async def wait_for(cond, what: str) -> None:
        deadline = time.monotonic() + 120
        while not cond():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            await asyncio.sleep(0.05)

    async def run() -> None:
        running = asyncio.create_task(answer(1, "running"))
        await wait_for(lambda: eng.num_running == 1, "the first request to run")
        launcher.gate.clear()      # the new ranks hold at start until the gate opens
        scale = asyncio.create_task(eng.run_in_loop(lambda c: c.scale_to(4)))
        await wait_for(lambda: client.scaler.scaling, "the scale to begin")

        # Sent after the scale began: it streams (and finishes) while the new ranks load.
        first = asyncio.Event()
        arrived = asyncio.create_task(answer(2, "arrived", first))
        await asyncio.wait_for(first.wait(), 120)
        assert client.scaler.scaling and not scale.done(), "its first token came before the scale ended"
        # Sent and dropped (a client disconnect) during the scale: its blocks come back.
        dropped = eng.generate(PROMPTS[3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                               "dropped")
        await anext(dropped)
        await dropped.aclose()
        assert await asyncio.wait_for(arrived, 120) == refs[2]
        assert await asyncio.wait_for(running, 120) == refs[1]
        await wait_for(lambda: (eng.num_running, eng.engine_stats().kv_cache_usage) == (0, 0.0),
                       "the dropped request's blocks to be freed")
        assert client.scaler.scaling and not scale.done() and client.world_size == 2, "all of it during the scale"

        launcher.gate.set()
        await asyncio.wait_for(scale, 300)
        assert client.world_size == 4
        after = await asyncio.gather(*(answer(i, f"after{i}") for i in range(len(PROMPTS))))
        assert after == refs, "greedy answers of one process, on the grown group"
        await wait_for(lambda: (eng.num_running, eng.num_waiting, eng.engine_stats().kv_cache_usage) == (0, 0, 0.0),
                       "block pools full again")
        assert not client.requests, "no request left behind"

    try:
        asyncio.run(run())
    finally:
        launcher.gate.set()     # a failed check leaves no rank held at start
        eng.shutdown()
