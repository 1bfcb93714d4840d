"""How many prefill and how many decode engines: a discrete-event model of the pools.

    python benchmarks/pd_planner.py validate [--seeds 8]
    python benchmarks/pd_planner.py plan --gpus 64 --input-len 2048 --output-len 256
    python benchmarks/pd_planner.py plan ... [--engine-json FILE]

The model takes measured per-engine rates and a traffic mix and simulates the pools:
Poisson arrivals, each request to the prefill engine with the least work queued (the
decode engine with the fewest requests); a prefill engine runs steps of up to
`max_num_batched_tokens` prompt tokens FIFO (chunked), taking `prefill_ms(tokens)`; the
KV then takes `kv_handoff_ms` to reach the decode engine, which admits it at its next
step (at most `max_num_seqs` running) and emits the first token at that step's end; a
decode step gives every running request one token and takes `decode_ms(batch)`. A
colocated engine runs mixed steps: its decodes plus prompt chunks within the token
budget, `decode_ms(batch) + prefill_ms(tokens)`. A request meets the SLOs when its
TTFT and its mean ITL are under the thresholds; goodput is those requests per second of
the run (first arrival to last completion), as benchmarks/pd_goodput_bench.py counts it.

Rates (defaults, --engine-json to replace them): DeepSeek-V2-Lite shape on one H200
(benchmarks/RESULTS.md, "Engine on one H200", 2026-11-23): decode step 3.52 / 6.94 /
10.97 / 14.73 ms at batch 1 / 8 / 64 / 256, linear in between; prefill 1024 tokens in one
step in 32.7 ms and 8192 in 137.4 ms (31.3k and 59.6k tokens/s), a step of n tokens at the
rate interpolated linearly in n between them; the KV hand-off 10.5 ms (median `tandem_kv_transfer_seconds` of the 2048-token pd goodput run, which
includes the decode engine's wait for its next step). `validate` runs the measured
two-GPU goodput benchmark's load (RESULTS.md, "Goodput: one prefill GPU + one decode GPU
against two colocated GPUs") and prints model against measurement; `plan` prints, for
prefill:decode splits of `--gpus` engines (one GPU each), the goodput each sustains: the
highest Poisson rate at which `--target` (90%) of the requests meet the SLOs, found by
bisection, and the goodput there (that rate x the share within the SLOs); then the best
split, and colocated engines beside it.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import random
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineRates:
    decode_ms: dict[int, float]            # batch -> step ms
    prefill_ms: dict[int, float]           # prompt tokens in one step -> step ms
    kv_handoff_ms: float

    def decode_step_s(self, batch: int) -> float:
        return interpolate(self.decode_ms, batch) / 1e3

    def prefill_step_s(self, tokens: int) -> float:
        """n tokens at the prefill rate measured for steps of about n tokens (the rate grows
        with the step: bigger matrix products)."""
        rates = {n: n / ms for n, ms in self.prefill_ms.items()}     # tokens per ms
        return tokens / interpolate(rates, tokens) / 1e3 if tokens else 0.0


def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise linear through the points, constant beyond the last."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    i = bisect.bisect_right(xs, x)
    a, b = xs[i - 1], xs[i]
    return points[a] + (points[b] - points[a]) * (x - a) / (b - a)


H200_DEEPSEEK_V2_LITE = EngineRates(decode_ms={1: 3.52, 8: 6.94, 64: 10.97, 256: 14.73},
                                    prefill_ms={1024: 32.7, 8192: 137.4}, kv_handoff_ms=10.5)


@dataclass(frozen=True)
class Traffic:
    rate: float                 # requests/s, Poisson
    num_requests: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0    # lengths uniform in [len * (1 - r), len * (1 + r)]


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


@dataclass
class Request:
    arrival: float
    prompt: int
    output: int
    left: int = 0               # prompt tokens not yet computed
    first: float | None = None  # first token
    done: float | None = None


@dataclass(eq=False)
class Engine:
    """One engine's state: prompt work FIFO, requests waiting to run, running requests
    (by the step count at which each finishes)."""
    kind: str                                        # prefill | decode | colocated
    prompts: deque = field(default_factory=deque)
    queued_tokens: int = 0
    ready: deque = field(default_factory=deque)      # decode: KV here, waiting for a slot
    finishing: list = field(default_factory=list)    # heap of (step it finishes on, id, request)
    admitted: list = field(default_factory=list)     # decode: joined at this step, first token at its end
    steps: int = 0
    busy: bool = False

    @property
    def running(self) -> int:
        return len(self.finishing)


class Simulation:
    """Discrete events: arrivals, engine step ends, KV arrivals."""

    def __init__(self, rates: EngineRates, settings: EngineSettings, prefill: int, decode: int,
                 colocated: int = 0) -> None:
        self.rates, self.settings = rates, settings
        self.prefill = [Engine("prefill") for _ in range(prefill)]
        self.decode = [Engine("decode") for _ in range(decode)]
        self.colocated = [Engine("colocated") for _ in range(colocated)]
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.next_colocated = 0

    def at(self, t: float, kind: str, *payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self, requests: list[Request]) -> None:
        for r in requests:
            self.at(r.arrival, "arrive", r)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, kind)(*payload)

    def arrive(self, r: Request) -> None:
        r.left = r.prompt
        if self.colocated:      # alternate, as the benchmark splits its arrivals
            e = self.colocated[self.next_colocated % len(self.colocated)]
            self.next_colocated += 1
        else:
            e = min(self.prefill, key=lambda p: p.queued_tokens)
        e.prompts.append(r)
        e.queued_tokens += r.prompt
        self.kick(e)

    def kick(self, e: Engine) -> None:
        if not e.busy and (e.prompts or e.ready or e.finishing):
            self.step(e)

    def take_prompts(self, e: Engine, budget: int, slots: int) -> tuple[int, list[Request]]:
        """Chunks of queued prompts within the token budget (FIFO); the prompts it completes."""
        used, done = 0, []
        for r in e.prompts:
            if used >= budget or slots <= 0:
                break
            n = min(r.left, budget - used)
            r.left -= n
            used += n
            slots -= 1
            if r.left == 0:
                done.append(r)
        for _ in done:                  # the completed ones are the queue's head
            e.prompts.popleft()
        e.queued_tokens -= used
        return used, done

    def step(self, e: Engine) -> None:
        s = self.settings
        if e.kind == "decode":
            # KV that arrived joins at this step; its first token comes at the step's end
            # with the step's own (so it finishes output - 1 steps on).
            while e.ready and e.running < s.max_num_seqs:
                r = e.ready.popleft()
                heapq.heappush(e.finishing, (e.steps + r.output - 1, id(r), r))
                e.admitted.append(r)
        tokens, prefilled = 0, []
        if e.kind != "decode":
            tokens, prefilled = self.take_prompts(e, s.max_num_batched_tokens - e.running,
                                                  s.max_num_seqs - e.running)
        if e.running == 0 and tokens == 0:
            e.busy = False
            return
        t = (self.rates.decode_step_s(e.running) if e.running else 0.0) + self.rates.prefill_step_s(tokens)
        e.busy = True
        self.at(self.now + t, "step_end", e, prefilled)

    def step_end(self, e: Engine, prefilled: list[Request]) -> None:
        e.steps += 1
        for r in e.admitted:
            r.first = self.now
        e.admitted.clear()
        while e.finishing and e.finishing[0][0] <= e.steps:
            heapq.heappop(e.finishing)[2].done = self.now
        for r in prefilled:
            if e.kind == "colocated":
                # The prompt's last chunk samples the first token; it then decodes here.
                r.first = self.now
                if r.output > 1:
                    heapq.heappush(e.finishing, (e.steps + r.output - 1, id(r), r))
                else:
                    r.done = self.now
            else:
                self.at(self.now + self.rates.kv_handoff_ms / 1e3, "kv_ready", r)
        e.busy = False
        self.kick(e)

    def kv_ready(self, r: Request) -> None:
        e = min(self.decode, key=lambda d: d.running + len(d.ready))
        e.ready.append(r)
        self.kick(e)


def make_requests(t: Traffic, seed: int) -> list[Request]:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - t.range_ratio))), max(1, int(mean * (1 + t.range_ratio)))
        return rng.randint(lo, hi)

    out, now = [], 0.0
    for _ in range(t.num_requests):
        out.append(Request(now, length(t.input_len), length(t.output_len)))
        now += rng.expovariate(t.rate)
    return out


@dataclass(frozen=True)
class Outcome:
    goodput: float
    attainment: float
    ttft_p50_ms: float
    itl_p50_ms: float


def simulate(rates: EngineRates, settings: EngineSettings, traffic: Traffic, prefill: int, decode: int,
             colocated: int, ttft_ms: float, itl_ms: float, seed: int) -> Outcome:
    requests = make_requests(traffic, seed)
    Simulation(rates, settings, prefill, decode, colocated).run(requests)
    itl = [(r.done - r.first) / (r.output - 1) if r.output > 1 else 0.0 for r in requests]
    ttft = [r.first - r.arrival for r in requests]
    good = sum(1 for a, b in zip(ttft, itl) if a * 1e3 <= ttft_ms and b * 1e3 <= itl_ms)
    duration = max(r.done for r in requests) - requests[0].arrival
    return Outcome(good / duration, good / len(requests), statistics.median(ttft) * 1e3,
                   statistics.median(itl) * 1e3)


def mean_outcome(seeds: int, **kw) -> Outcome:
    runs = [simulate(seed=s, **kw) for s in range(seeds)]
    return Outcome(*(statistics.fmean(getattr(r, f) for r in runs) for f in Outcome.__dataclass_fields__))


# benchmarks/RESULTS.md, "Goodput: one prefill GPU + one decode GPU against two colocated
# GPUs" (nvidia-h200-x2, 2026-11-23): goodput req/s with TTFT <= 1000 ms, mean ITL <= 25 ms.
MEASURED_2GPU = {("colocated", 4): 3.92, ("pd", 4): 3.76, ("colocated", 8): 6.57, ("pd", 8): 7.13,
                 ("colocated", 16): 10.60, ("pd", 16): 10.97, ("colocated", 32): 15.70, ("pd", 32): 6.50}


def validate(rates: EngineRates, seeds: int) -> list[dict]:
    settings = EngineSettings(max_num_seqs=64, max_num_batched_tokens=2048)
    rows = []
    for (mode, rate), measured in MEASURED_2GPU.items():
        traffic = Traffic(rate=rate, num_requests=96, input_len=2048, output_len=256)
        split = {"prefill": 1, "decode": 1, "colocated": 0} if mode == "pd" else \
            {"prefill": 0, "decode": 0, "colocated": 2}
        o = mean_outcome(seeds, rates=rates, settings=settings, traffic=traffic, ttft_ms=1000, itl_ms=25, **split)
        rows.append({"mode": mode, "rate": rate, "measured": measured, "model": round(o.goodput, 2),
                     "error_pct": round(100 * (o.goodput - measured) / measured, 1),
                     "attainment": round(o.attainment, 3), "ttft_p50_ms": round(o.ttft_p50_ms, 1),
                     "itl_p50_ms": round(o.itl_p50_ms, 1)})
    return rows


def capacity(rates: EngineRates, settings: EngineSettings, mix: Traffic, split: dict, ttft_ms: float,
             itl_ms: float, seeds: int, target: float, upper: float, duration_s: float,
             iterations: int = 7) -> tuple[float, Outcome]:
    """The highest arrival rate at which the split keeps `target` of the requests within
    the SLOs over `duration_s` of arrivals (bisection over the rate), and its outcome there."""
    lo, hi, best = 0.0, upper, Outcome(0.0, 1.0, 0.0, 0.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        traffic = Traffic(mid, max(100, int(mid * duration_s)), mix.input_len, mix.output_len, mix.range_ratio)
        o = mean_outcome(seeds, rates=rates, settings=settings, traffic=traffic, ttft_ms=ttft_ms, itl_ms=itl_ms,
                         **split)
        if o.attainment >= target:
            lo, best = mid, o
        else:
            hi = mid
    return lo, best


def plan(rates: EngineRates, gpus: int, mix: Traffic, settings: EngineSettings, ttft_ms: float, itl_ms: float,
         seeds: int, step: int, target: float, duration_s: float) -> list[dict]:
    """Each prefill:decode split's goodput capacity (requests/s with `target` of them in
    the SLOs): a coarse grid of splits, then finer around the best, and colocated engines."""
    upper = gpus * 1e3 * max(rates.prefill_ms) / rates.prefill_ms[max(rates.prefill_ms)] / mix.input_len

    def row(split: dict) -> dict:
        rate, o = capacity(rates, settings, mix, split, ttft_ms, itl_ms, seeds, target, upper, duration_s)
        # Steady state: the requests per second that meet the SLOs at that rate.
        return {**split, "max_rate": round(rate, 1), "goodput": round(rate * o.attainment, 1),
                "attainment": round(o.attainment, 3), "ttft_p50_ms": round(o.ttft_p50_ms, 1),
                "itl_p50_ms": round(o.itl_p50_ms, 1)}

    rows: dict[int, dict] = {}
    candidates = range(step, gpus, step)
    while True:
        for p in candidates:
            if p not in rows:
                rows[p] = row({"prefill": p, "decode": gpus - p, "colocated": 0})
        best = max(rows.values(), key=lambda r: r["goodput"])["prefill"]
        if step == 1:
            break
        step = max(1, step // 2)
        candidates = [p for p in (best - step, best + step) if 0 < p < gpus]
    out = [rows[p] for p in sorted(rows)]
    out.append(row({"prefill": 0, "decode": 0, "colocated": gpus}))
    return out


def load_rates(path: str | None) -> EngineRates:
    if not path:
        return H200_DEEPSEEK_V2_LITE
    with open(path) as f:
        d = json.load(f)
    return EngineRates(decode_ms={int(k): float(v) for k, v in d["decode_step_ms"].items()},
                       prefill_ms={int(k): float(v) for k, v in d["prefill_step_ms"].items()},
                       kv_handoff_ms=float(d["kv_handoff_ms"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["validate", "plan"])
    p.add_argument("--engine-json", default=None, help='{"decode_step_ms": {batch: ms}, "prefill_step_ms": '
                                                       '{tokens: ms}, "kv_handoff_ms": ms} (default: H200 figures)')
    p.add_argument("--seeds", type=int, default=8, help="runs averaged per point (default: 8)")
    p.add_argument("--gpus", type=int, default=64, help="plan: engines, one GPU each (default: 64)")
    p.add_argument("--duration-s", type=float, default=15.0, help="plan: seconds of arrivals per run (default: 15)")
    p.add_argument("--input-len", type=int, default=2048, help="plan: prompt tokens (default: 2048)")
    p.add_argument("--output-len", type=int, default=256, help="plan: output tokens (default: 256)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="plan: lengths uniform in len x [1-r, 1+r]")
    p.add_argument("--max-num-seqs", type=int, default=256, help="plan: per engine (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="plan: per step (default: 2048)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="(default: 1000)")
    p.add_argument("--slo-itl-ms", type=float, default=25.0, help="(default: 25)")
    p.add_argument("--step", type=int, default=8, help="plan: coarse grid of prefill engines (default: 8)")
    p.add_argument("--target", type=float, default=0.9,
                   help="plan: share of requests within the SLOs a split must keep (default: 0.9)")
    ns = p.parse_args(argv)
    rates = load_rates(ns.engine_json)
    if ns.command == "validate":
        rows = validate(rates, ns.seeds)
        for r in rows:
            print(json.dumps(r))
        errors = [abs(r["error_pct"]) for r in rows]
        print(json.dumps({"mean_abs_error_pct": round(statistics.fmean(errors), 1),
                          "max_abs_error_pct": max(errors)}))
        return 0
    mix = Traffic(rate=0.0, num_requests=0, input_len=ns.input_len, output_len=ns.output_len,
                  range_ratio=ns.range_ratio)
    settings = EngineSettings(ns.max_num_seqs, ns.max_num_batched_tokens)
    rows = plan(rates, ns.gpus, mix, settings, ns.slo_ttft_ms, ns.slo_itl_ms, ns.seeds, ns.step, ns.target,
                ns.duration_s)
    for r in rows:
        print(json.dumps(r))
    best = max((r for r in rows if not r["colocated"]), key=lambda r: r["goodput"])
    colocated = next(r for r in rows if r["colocated"])
    print(json.dumps({"best_split": f"{best['prefill']}:{best['decode']}", "goodput": best["goodput"],
                      "colocated_goodput": colocated["goodput"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
