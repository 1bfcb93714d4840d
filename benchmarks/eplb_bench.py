"""EPLB placement policy: balancedness on skewed traces, and time to compute a placement.

Traces are synthetic per-window token counts. Each token picks `topk` distinct
experts; expert e is picked with probability p_e, Zipf-like (p ~ rank^-S, capped at 1
and scaled to sum to topk; hot experts differ per layer), so its count in a window is
Binomial(tokens, p_e). Placements are computed on one window and scored on the next,
so sampling noise (and, for the shifting trace, drift) counts against them as it
would in serving:
  zipf-S   fixed popularity with exponent S; the next window is a fresh sample;
  shift    exponent 0.6, log-popularity does a random walk between windows;
           scores are averaged over consecutive window pairs.
Columns: the contiguous baseline (no EPLB), DeepSeek's published algorithm (its mode
choice, hierarchical when groups divide over nodes, with plain LPT packing; it
reproduces the README example of deepseek-ai/EPLB exactly), our hierarchical and global
rebalancing, global without the swap pass (plain LPT packing), and global scored on the
window it was computed from (what perfect load prediction would give). The summary
line compares global (what the EP engine uses) with DeepSeek's on the same traces.

Run: .venv/bin/python benchmarks/eplb_bench.py [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb import Placement, balancedness, contiguous_placement, rebalance  # noqa: E402

WORLD_SIZES = (8, 16, 32, 64)
REDUNDANT = (0, 32, 64)
# Exponent 0.6 gives a (max - mean) / mean expert load of ~11 at 256 experts, top-8:
# what TRT-LLM measured for DeepSeek-R1 (10.95). 0.4 is milder, 0.8 harsher.
EXPONENTS = (0.4, 0.6, 0.8)
SHIFT_EXPONENT = 0.6
COLUMNS = ("baseline", "deepseek", "hier", "global", "global_lpt", "global_same")


def selection_probability(logits: Tensor, topk: int) -> Tensor:
    """Chance that one token picks each expert [layers, experts]: proportional to
    exp(logits) but capped at 1 (a token picks an expert at most once) and summing to
    topk. Water-filling: cap the experts that overflow, rescale the others, repeat."""
    p = (logits - logits.amax(1, keepdim=True)).exp().double()
    capped = torch.zeros_like(p, dtype=torch.bool)
    for _ in range(topk + 1):  # each round caps at least one more expert, or stops
        free = p.masked_fill(capped, 0.0)
        scale = (topk - capped.sum(1, keepdim=True)) / free.sum(1, keepdim=True)
        prob = torch.where(capped, 1.0, free * scale)
        if not bool((prob > 1).any()):
            return prob
        capped |= prob >= 1
    return prob.clamp(max=1.0)


def route(logits: Tensor, tokens: int, topk: int, gen: torch.Generator) -> Tensor:
    """Token counts [layers, experts] for one window: Binomial(tokens, p) per expert."""
    prob = selection_probability(logits, topk)
    return torch.binomial(torch.full_like(prob, float(tokens)), prob, generator=gen).float()


def zipf_logits(layers: int, experts: int, exponent: float, gen: torch.Generator) -> Tensor:
    rank = torch.rand(layers, experts, generator=gen).argsort(1).argsort(1) + 1
    return -exponent * rank.double().log()


def make_traces(args: argparse.Namespace) -> dict[str, list[Tensor]]:
    """Name -> consecutive windows of expert load."""
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.layers, args.experts)
    traces = {}
    for s in EXPONENTS:
        logits = zipf_logits(*shape, s, gen)
        traces[f"zipf-{s}"] = [route(logits, args.tokens, args.topk, gen) for _ in range(2)]
    logits = zipf_logits(*shape, SHIFT_EXPONENT, gen)
    windows = []
    for _ in range(args.shift_windows):
        windows.append(route(logits, args.tokens, args.topk, gen))
        logits = logits + args.drift * torch.randn(shape, generator=gen, dtype=torch.float64)
    traces["shift"] = windows
    return traces


def score(load: Tensor, placement: Placement, gpus: int) -> float:
    return balancedness(load, placement, gpus).mean().item()


def evaluate(windows: list[Tensor], gpus: int, redundant: int, args: argparse.Namespace) -> dict[str, float]:
    """Mean balancedness over layers and over (past window, next window) pairs."""
    replicas = args.experts + redundant
    nodes = max(1, gpus // args.gpus_per_node)
    sums = dict.fromkeys(COLUMNS + ("deepseek_same",), 0.0)
    base = contiguous_placement(args.layers, args.experts, gpus)
    for past, nxt in zip(windows, windows[1:]):
        glob = rebalance(past, replicas, args.groups, nodes, gpus, hierarchical=False)
        sums["baseline"] += score(nxt, base, gpus)
        deepseek = rebalance(past, replicas, args.groups, nodes, gpus, refine=False)
        sums["deepseek"] += score(nxt, deepseek, gpus)
        sums["deepseek_same"] += score(past, deepseek, gpus)
        sums["hier"] += score(nxt, rebalance(past, replicas, args.groups, nodes, gpus), gpus)
        sums["global"] += score(nxt, glob, gpus)
        lpt = rebalance(past, replicas, args.groups, nodes, gpus, hierarchical=False, refine=False)
        sums["global_lpt"] += score(nxt, lpt, gpus)
        sums["global_same"] += score(past, glob, gpus)
    return {k: v / (len(windows) - 1) for k, v in sums.items()}


def balance_table(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, windows in make_traces(args).items():
        for gpus in WORLD_SIZES:
            for redundant in REDUNDANT:
                row = {"trace": name, "gpus": gpus, "redundant": redundant}
                replicas = args.experts + redundant
                if replicas % gpus:
                    row["skipped"] = f"{replicas} slots do not divide over {gpus} GPUs"
                else:
                    row["slots_per_gpu"] = replicas // gpus
                    row.update(evaluate(windows, gpus, redundant, args))
                rows.append(row)
    return rows


def time_placement(args: argparse.Namespace) -> list[dict]:
    """Median wall time of rebalance() for the DeepSeek-V3 shape on 64 (and 32) GPUs."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    load = route(zipf_logits(args.layers, args.experts, SHIFT_EXPONENT, gen), args.tokens, args.topk, gen)
    cases = [(64, 8, args.experts + 64), (64, 8, args.experts), (32, 4, args.experts + 32)]
    rows = []
    for gpus, nodes, replicas in cases:
        for variant, hierarchical in (("hier", True), ("global", False)):
            rebalance(load, replicas, args.groups, nodes, gpus, hierarchical=hierarchical)  # warm-up
            wall, cpu = [], []
            for _ in range(args.timing_runs):
                start, start_cpu = time.perf_counter(), time.process_time()
                rebalance(load, replicas, args.groups, nodes, gpus, hierarchical=hierarchical)
                wall.append((time.perf_counter() - start) * 1e3)
                cpu.append((time.process_time() - start_cpu) * 1e3)
            rows.append(
                {
                    "gpus": gpus, "nodes": nodes, "replicas": replicas, "variant": variant,
                    "median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
                    # CPU time of all torch threads: less sensitive to other load on a shared machine.
                    "median_cpu_ms": statistics.median(cpu),
                }
            )
    return rows


def print_report(balance: list[dict], timing: list[dict], args: argparse.Namespace, env: dict) -> None:
    print(f"EPLB policy benchmark: {args.layers} layers x {args.experts} experts, {args.groups} groups, "
          f"{args.gpus_per_node} GPUs/node, top-{args.topk}, {args.tokens} tokens/window")
    print(f"machine: {env['machine']}, torch {env['torch']} ({env['threads']} threads)\n")
    print("Balancedness (mean GPU load / max GPU load, mean over layers), scored on the next window")
    head = f"{'trace':<9}{'GPUs':>5}{'redund':>7}{'slots':>6}  " + "".join(f"{c:>12}" for c in COLUMNS)
    print(head)
    print("-" * len(head))
    last = None
    for row in balance:
        if last is not None and row["trace"] != last:
            print()
        last = row["trace"]
        lead = f"{row['trace']:<9}{row['gpus']:>5}{row['redundant']:>7}"
        if "skipped" in row:
            print(f"{lead}{'-':>6}  skipped: {row['skipped']}")
        else:
            print(f"{lead}{row['slots_per_gpu']:>6}  " + "".join(f"{row[c]:>12.3f}" for c in COLUMNS))
    scored = [r for r in balance if "skipped" not in r]
    print()
    for label, ours, theirs in (("next window", "global", "deepseek"),
                                ("same window", "global_same", "deepseek_same")):
        gaps = [r[ours] - r[theirs] for r in scored]
        print(f"global - deepseek ({label}, {len(gaps)} rows): min {min(gaps):+.4f}, "
              f"mean {statistics.mean(gaps):+.4f}, max {max(gaps):+.4f}")
    print(f"\nTime to compute a placement ({args.layers} layers x {args.experts} experts, "
          f"{args.timing_runs} runs; wall time, and median CPU time of all threads)")
    print(f"{'GPUs':>5}{'nodes':>6}{'replicas':>9}{'variant':>8}{'median ms':>11}{'min ms':>8}{'max ms':>8}"
          f"{'CPU ms':>8}")
    for r in timing:
        print(f"{r['gpus']:>5}{r['nodes']:>6}{r['replicas']:>9}{r['variant']:>8}"
              f"{r['median_ms']:>11.1f}{r['min_ms']:>8.1f}{r['max_ms']:>8.1f}{r['median_cpu_ms']:>8.1f}")


def cpu_model() -> str:
    with contextlib.suppress(OSError):   # no /proc/cpuinfo: fall back to platform
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--topk", type=int, default=8)
    # vLLM's default window is 1000 steps; 2^20 tokens is ~1k tokens per step.
    parser.add_argument("--tokens", type=int, default=2**20, help="tokens per window")
    parser.add_argument("--shift-windows", type=int, default=6)
    parser.add_argument("--drift", type=float, default=0.3, help="log-popularity step per window")
    parser.add_argument("--timing-runs", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()

    env = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version()}
    started = time.perf_counter()
    balance = balance_table(args)
    timing = time_placement(args)
    print_report(balance, timing, args, env)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(
            {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "env": env, "balancedness": balance, "timing": timing}, indent=2))


if __name__ == "__main__":
    main()
