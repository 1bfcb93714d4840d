"""The SLO autoscaling policy on recorded metric sequences, run the way Serve's controller
runs it: built from the pool's autoscaling_config (Serve's own AutoscalingConfig), wrapped
by Serve's delay logic, fed an AutoscalingContext whose series come from PoolLoad meters
driven by a small simulation of replicas (prompts arriving, prefilled at a fixed rate,
tokens streamed at a fixed gap), sampled and pruned as a replica reports them."""

from __future__ import annotations

import time
from collections import deque

import pytest
from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.autoscaling import (
    AutoscalingSettings,
    PoolSignals,
    decide,
    parse_autoscaling,
    serve_autoscaling_config,
)
from cluster.pool_load import PoolLoad
from cluster.settings import parse_settings

TTFT_MS, ITL_MS = 1000.0, 100.0
LOOK_BACK_S, REPORT_S, DT = 10.0, 0.5, 0.05


class SimReplica:
    """One replica in simulated time: prompts prefilled FIFO at `rate` tokens/s, then each
    running request gets a token every `itl_s`; its PoolLoad reads the simulated clock."""

    def __init__(self, clock, rate: float, itl_s: float, kv_per_request: float = 0.01) -> None:
        self.load = PoolLoad(clock=clock)
        self.rate, self.itl_s, self.kv_per_request = rate, itl_s, kv_per_request
        self.queue: deque[list] = deque()      # [rid, tokens left]
        self.decoding: dict[str, list] = {}    # rid -> [tokens left, time to next token]
        self.series: dict[str, list[TimeStampedValue]] = {}

    def submit(self, rid: str, prompt: int, output: int) -> None:
        self.load.admit(rid, prompt)
        self.queue.append([rid, prompt, output])

    def step(self) -> None:
        budget = self.rate * DT
        while self.queue and budget > 0:
            head = self.queue[0]
            used = min(budget, head[1])
            head[1] -= used
            budget -= used
            if head[1] <= 0:
                rid, _, output = self.queue.popleft()
                self.load.tokens(rid, 1)
                self.decoding[rid] = [output - 1, self.itl_s]
        for rid, state in list(self.decoding.items()):
            state[1] -= DT
            if state[1] <= 1e-9:
                self.load.tokens(rid, 1)
                state[0] -= 1
                state[1] += self.itl_s
            if state[0] <= 0:
                self.load.finish(rid)
                del self.decoding[rid]

    def report(self, now: float) -> None:
        kv = min(1.0, self.kv_per_request * len(self.decoding))
        for name, value in self.load.stats(kv, len(self.decoding)).items():
            points = self.series.setdefault(name, [])
            points.append(TimeStampedValue(now, value))
            while points and points[0].timestamp < now - LOOK_BACK_S:   # the replica prunes its window
                points.pop(0)


class Pool:
    """Simulated replicas of one pool, scaled by the policy through Serve's wrapper."""

    def __init__(self, kind: str, replicas: int, rate: float = 1000.0, itl_s: float = 0.02, **settings) -> None:
        self.now = 0.0
        self.kind, self.rate, self.itl_s = kind, rate, itl_s
        self.settings = AutoscalingSettings(**{"upscale_delay_s": 0, "downscale_delay_s": 0,
                                                "look_back_period_s": LOOK_BACK_S,
                                                "metrics_interval_s": REPORT_S, **settings})
        config = serve_autoscaling_config(kind, self.settings, TTFT_MS, ITL_MS, "tandem-default")
        config["policy"]["policy_kwargs"]["publish"] = False
        self.config = AutoscalingConfig(**config)
        policy = self.config.policy.get_policy()(**self.config.policy.policy_kwargs)
        self.policy = _apply_autoscaling_config(policy)
        self.state: dict = {}
        self.replicas = [self._new() for _ in range(replicas)]
        self.target = replicas
        self.history: list[int] = []
        self.next_id = 0

    def _new(self) -> SimReplica:
        return SimReplica(lambda: self.now, self.rate, self.itl_s)

    def context(self) -> AutoscalingContext:
        raw: dict = {}
        for i, r in enumerate(self.replicas):
            for name, points in r.series.items():
                raw.setdefault(name, {})[f"r{i}"] = list(points)
        return AutoscalingContext(
            deployment_id=DeploymentID(name=self.kind, app_name="tandem"), deployment_name=self.kind,
            app_name="tandem", current_num_replicas=len(self.replicas), target_num_replicas=self.target,
            running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics={},
            raw_metrics=raw, capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=dict(self.state),
            last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=self.config)

    def run(self, seconds: float, prompts_per_s: float, prompt: int = 500, output: int = 20) -> None:
        """Poisson-free, evenly spaced arrivals, round-robin over the replicas; the policy
        decides every report interval once a window is recorded, and Serve's new target
        takes effect at once (replicas start or stop between reports)."""
        owed = 0.0
        end = self.now + seconds
        while self.now < end - 1e-9:
            owed += prompts_per_s * DT
            while owed >= 1:
                owed -= 1
                self.replicas[self.next_id % len(self.replicas)].submit(f"q{self.next_id}", prompt, output)
                self.next_id += 1
            for r in self.replicas:
                r.step()
            self.now += DT
            if round(self.now / REPORT_S, 6).is_integer():
                for r in self.replicas:
                    r.report(self.now)
                self.decide()

    def decide(self) -> None:
        self.target, self.state = self.policy(self.context())
        self.history.append(self.target)
        while len(self.replicas) < self.target:
            self.replicas.append(self._new())
        while len(self.replicas) > self.target:     # the newest replica drains and goes
            gone = self.replicas.pop()
            for rid, tokens, output in gone.queue:
                self.replicas[0].submit(rid, tokens, output)


def test_prefill_holds_steady_under_steady_load():
    # 2 replicas at 1000 tokens/s, 1.2 prompts/s each of 500 tokens: each busy 60%, little backlog.
    pool = Pool("prefill", replicas=2, min_replicas=1, max_replicas=6)
    pool.run(20, prompts_per_s=2.4)
    assert set(pool.history[-20:]) == {2}, pool.history


def test_prefill_scales_up_under_a_backlog_then_down_when_idle_within_bounds():
    pool = Pool("prefill", replicas=1, min_replicas=1, max_replicas=4)
    pool.run(3, prompts_per_s=1)
    assert set(pool.history) == {1}, pool.history                # 50% busy: one replica is enough
    pool.run(15, prompts_per_s=12)                               # 6000 tokens/s against 1000 per replica
    assert max(pool.history) == 4, pool.history                  # up to the bound, never over
    ups = [b - a for a, b in zip(pool.history, pool.history[1:]) if b > a]
    assert ups and max(ups) <= pool.settings.max_upscale_step, pool.history
    pool.run(30, prompts_per_s=0)
    assert pool.history[-1] == 1 and min(pool.history) >= 1, pool.history
    downs = [a - b for a, b in zip(pool.history, pool.history[1:]) if b < a]
    assert downs and max(downs) <= pool.settings.max_downscale_step, pool.history
    assert all(not r.queue for r in pool.replicas)                # every prompt was prefilled


def test_upscale_waits_for_serves_delay():
    pool = Pool("prefill", replicas=1, min_replicas=1, max_replicas=4, upscale_delay_s=600)
    pool.run(10, prompts_per_s=12)
    assert set(pool.history) == {1}, pool.history


def test_decode_scales_on_itl_and_on_kv_usage():
    slow = Pool("decode", replicas=1, min_replicas=1, max_replicas=3, itl_s=0.2)   # ITL 2x the SLO
    slow.run(8, prompts_per_s=2, prompt=20, output=40)
    assert max(slow.history) == 3, slow.history
    fast = Pool("decode", replicas=2, min_replicas=1, max_replicas=3, itl_s=0.02)
    fast.run(8, prompts_per_s=2, prompt=20, output=40)            # ITL far under, KV use low
    assert fast.history[-1] == 1, fast.history
    alone = Pool("decode", replicas=1, min_replicas=1, max_replicas=3, itl_s=0.2)   # one request at a time
    alone.run(8, prompts_per_s=0.1, prompt=20, output=40)
    assert set(alone.history) == {1}, alone.history          # more replicas cannot lower its ITL
    full = PoolSignals(replicas=2, kv_cache_usage=0.95)
    assert decide("decode", full, 2, TTFT_MS, ITL_MS, AutoscalingSettings(max_replicas=8)).desired == 3


def test_colocated_scales_on_either_signal():
    s = AutoscalingSettings(min_replicas=1, max_replicas=8, max_upscale_step=8)
    backlog = PoolSignals(replicas=2, prompt_tokens_waiting=4000, busy_replicas=2, prefill_tokens_per_s=1000)
    assert decide("colocated", backlog, 2, TTFT_MS, ITL_MS, s).desired == 8        # 4000 / (1000 * 0.5)
    assert decide("decode", backlog, 2, TTFT_MS, ITL_MS, s).desired == 1
    slow = PoolSignals(replicas=2, itl_s=0.12, running=8)
    assert decide("colocated", slow, 2, TTFT_MS, ITL_MS, s).desired == 3           # 2 * 0.12 / 0.08
    assert decide("prefill", slow, 2, TTFT_MS, ITL_MS, s).desired == 1


def test_pool_load_counts_prefill_and_gaps():
    now = [0.0]
    load = PoolLoad(clock=lambda: now[0])
    load.admit("a", 100)
    load.admit("b", 50)
    assert load.stats(0.0, 0)["prompt_tokens_waiting"] == 150
    now[0] = 1.0
    load.tokens("a", 1)
    now[0] = 1.5
    load.tokens("b", 1)
    now[0] = 2.0
    load.tokens("a", 2)
    load.finish("a")
    load.finish("b")
    stats = load.stats(0.25, 3)
    assert stats["prompt_tokens_prefilled"] == 150 and stats["prefill_busy_seconds"] == 1.5
    assert stats["itl_seconds_sum"] == 1.0 and stats["itl_count"] == 2
    assert stats["prompt_tokens_waiting"] == 0 and stats["kv_cache_usage_perc"] == 0.25
    assert stats["num_requests_running"] == 3


@pytest.mark.parametrize("block, message", [
    ({"min_replicas": 0, "max_replicas": 2}, "min_replicas must be >= 1"),
    ({"min_replicas": 3, "max_replicas": 2}, "must be >= min_replicas"),
    ({"max_replica": 2}, "unknown autoscaling settings: max_replica"),
    ({"max_replicas": 2, "ttft_slo_fraction": 1.5}, "ttft_slo_fraction must be in"),
    ({"max_replicas": 2, "look_back_period_s": 10}, "look_back_period_s .10.* must be greater than metrics_interval_s"),
])
def test_bad_autoscaling_settings_say_what_to_change(block, message):
    with pytest.raises(ValueError, match=message):
        parse_autoscaling(block)


def test_settings_without_autoscaling_keep_replicas_fixed():
    settings = parse_settings({"pools": {"prefill": {"replicas": 2},
                                         "decode": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}}})
    assert settings.pool("prefill").autoscaling is None and settings.pool("prefill").max_num_replicas == 2
    assert settings.pool("decode").autoscaling.max_replicas == 3 and settings.pool("decode").max_num_replicas == 3
    with pytest.raises(ValueError, match="not to the router"):
        parse_settings({"pools": {"router": {"autoscaling": {"max_replicas": 2}}}})


def test_tandem_serve_autoscaling_flags_set_the_pools():
    from cluster.cli import parser
    from cluster.serve_args import app_args

    def args(*argv):
        return app_args(parser().parse_args(["serve", *argv]))

    pools = args("--autoscaling-config", '{"min_replicas": 1, "max_replicas": 4}',
                 "--decode-autoscaling-config", '{"max_replicas": 8, "downscale_delay_s": 60}')["pools"]
    assert pools["prefill"]["autoscaling"] == {"min_replicas": 1, "max_replicas": 4}
    assert pools["decode"]["autoscaling"] == {"min_replicas": 1, "max_replicas": 8, "downscale_delay_s": 60}
    assert "autoscaling" not in pools["colocated"]
    colocated = args("--mode", "colocated", "--autoscaling-config", '{"max_replicas": 3}')["pools"]
    assert colocated["colocated"]["autoscaling"] == {"max_replicas": 3} and "autoscaling" not in colocated["decode"]
    settings = parse_settings(args("--prefill-autoscaling-config", '{"max_replicas": 2}'))
    assert settings.pool("prefill").autoscaling.max_replicas == 2 and settings.pool("decode").autoscaling is None
    with pytest.raises(SystemExit, match="--decode-autoscaling-config is not JSON"):
        args("--decode-autoscaling-config", "{max: 2}")
    with pytest.raises(ValueError, match="unknown autoscaling settings: max"):
        parse_settings(args("--autoscaling-config", '{"max": 2}'))


def test_bench_serve_ramps_the_request_rate_as_vllm_does():
    import argparse

    from cluster import bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)

    def rates(*argv):
        ns = parser.parse_args(["--num-prompts", "5", *argv])
        bench_serve.settings(ns)
        return [round(bench_serve.request_rate(ns, i, 5), 3) for i in range(5)]

    assert rates("--request-rate", "3") == [3] * 5
    assert rates("--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "9") == [1, 3, 5, 7, 9]
    assert rates("--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "1",
                 "--ramp-up-end-rps", "16") == [1, 2, 4, 8, 16]
    with pytest.raises(SystemExit, match="--ramp-up-start-rps and --ramp-up-end-rps"):
        rates("--ramp-up-strategy", "linear", "--ramp-up-end-rps", "9")
