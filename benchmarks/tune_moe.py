"""Tune the fused MoE kernels on this GPU and write them as the data files the kernel reads
(engine/kernels/moe_configs.py), vLLM-style: one file per (experts, intermediate size,
device), keys token counts, values the fastest config at that count.

    python benchmarks/tune_moe.py [--model deepseek-v2-lite,qwen3-30b-a3b] [--tokens 1,8,...]
                                  [--out-dir engine/kernels/configs] [--rep-ms 25] [--budget-s 280]

A config is tiles plus a tile walk (engine/kernels/moe.py, MoEConfig). Per token count:
1. tiles on the plain walk (one program per tile, no grouping, pointer loads: the
   kernel as it was before walks existed), a small grid around what the count's regime
   needs: streaming weights at decode sizes (few rows per expert), matrix-bound tiles at
   prefill sizes;
2. the best two tiles again on each new walk (grouped order, persistent programs, loop
   flattening, TMA weight loads), then the best two of those with the down projection's
   tile twice as wide;
3. the best of each kind timed once more, and the faster one written, so a new walk is
   chosen only where it beats the plain one.
Routing is random (softmax of Gaussian logits, top-k), so every expert sees about the
same load, as in the engine's prefill on random prompts. Each candidate is checked
against the output of the config in use now (one that miscomputes, or does not
compile, is dropped) and timed with triton.testing.do_bench (median). The budget is
shared by the (model, count) cases; a case out of time stops trying candidates.
One JSON line per case: the config in use now, the best plain and the best new walk,
each with ms and TFLOP/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"deepseek-v2-lite": (64, 2048, 1408, 6), "qwen3-30b-a3b": (128, 2048, 768, 8)}   # E, H, N, top-k
TOKENS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def plain_tiles(rows_per_expert: float):
    from engine.kernels.moe import MoEConfig
    if rows_per_expert <= 8:
        grid = itertools.product([16], [32, 64, 128], [128], [4], [3, 4])
    elif rows_per_expert <= 64:
        grid = itertools.product([32, 64], [64, 128], [64, 128], [4], [3])
    else:       # 256-wide tiles of gate + up overflow shared memory
        grid = itertools.product([128, 64], [128], [64], [8, 4], [3])
    return [MoEConfig(*c) for c in grid]


def walks(tile, rows_per_expert: float):
    """The new walks of a tile, likeliest first: (group_m, persistent, flatten, tma)."""
    if rows_per_expert <= 8:     # weight streaming: order matters little, TMA and fewer programs may
        ws = [(0, 0, False, True), (1, 0, False, True), (1, 0, False, False), (0, 4, False, True), (0, 4, True, True)]
    else:                        # keep a block's rows and its expert's weights in L2
        ws = [(8, 0, False, False), (8, 0, False, True), (1, 0, False, True), (8, 1, True, True), (8, 1, False, True),
              (8, 2, True, True), (8, 2, False, True), (8, 1, True, False)]
    return [tile._replace(group_m=g, persistent=p, flatten=f, tma=t) for g, p, f, t in ws]


def is_plain(c) -> bool:
    return c.group_m == 0 and c.persistent == 0 and not c.tma and c.down_block_n == 0


def tune_case(E: int, H: int, N: int, K: int, T: int, w13, w2, rep_ms: float, deadline: float) -> dict:
    import triton
    from engine.kernels.moe import fused_moe_triton, moe_config
    dev = w13.device
    g = torch.Generator(device=dev).manual_seed(T)
    x = torch.randn(T, H, device=dev, generator=g).bfloat16()
    w, ids = torch.randn(T, E, device=dev, generator=g).softmax(-1).topk(K, dim=-1)
    w = w.bfloat16()
    run = lambda c: fused_moe_triton(x, w13, w2, ids, w, c)  # noqa: E731
    bench = lambda c: triton.testing.do_bench(lambda: run(c), warmup=5, rep=rep_ms, return_mode="median")  # noqa: E731
    current = moe_config(T, K, E, N, dev)
    ref = run(current).float()
    timings = {}

    def attempt(c, force: bool = False) -> None:
        if c in timings or (time.perf_counter() > deadline and not force):
            return
        try:
            out = run(c).float()
            if ((out - ref).norm() / ref.norm()).item() > 1e-2:
                print(f"  {tuple(c)}: wrong output, dropped", flush=True)
                return
            timings[c] = bench(c)
        except Exception as e:    # out of shared memory, say: not a candidate here
            print(f"  {tuple(c)}: {type(e).__name__}: {str(e)[:120]}", flush=True)

    rows = T * K / E
    attempt(current, force=True)
    for i, c in enumerate(plain_tiles(rows)):
        attempt(c, force=i == 0)      # at least one plain tile, whatever the clock says
    plain = sorted((c for c in timings if is_plain(c)), key=timings.get)
    for tile in plain[:2]:
        for c in walks(tile, rows):
            attempt(c)
    if rows > 8:     # the down projection has one accumulator: room for twice the columns
        for c in sorted((c for c in timings if not is_plain(c)), key=timings.get)[:2]:
            if c.block_n < 256:
                attempt(c._replace(down_block_n=2 * c.block_n))
    best_plain = min((c for c in timings if is_plain(c)), key=timings.get)
    new = [c for c in timings if not is_plain(c)]
    best_new = min(new, key=timings.get) if new else None
    # Time the two finalists again, back to back; the new walk must win this too.
    final = {c: bench(c) for c in (best_plain, best_new) if c is not None}
    chosen = min(final, key=final.get)
    flops = 2 * T * K * 3 * H * N

    def row(c, ms):
        return None if c is None else dict(config=tuple(c), ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))

    line = dict(E=E, N=N, tokens=T, current=row(current, timings.get(current, float("nan"))),
                plain=row(best_plain, final[best_plain]), new=row(best_new, final.get(best_new, float("nan"))),
                chosen=tuple(chosen), candidates=len(timings))
    print(json.dumps(line), flush=True)
    return dict(line, entry=chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "engine" / "kernels" / "configs")
    ap.add_argument("--rep-ms", type=float, default=25)
    ap.add_argument("--budget-s", type=float, default=280, help="for all cases together")
    args = ap.parse_args()
    from engine.kernels.moe import config_entry
    from engine.kernels.moe_configs import config_file_name
    tokens = [int(t) for t in args.tokens.split(",")]
    models = args.model.split(",")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start, cases, done, results = time.perf_counter(), len(models) * len(tokens), 0, []
    dev = torch.device("cuda")
    device_name = torch.cuda.get_device_name(dev)
    for model in models:
        E, H, N, K = SHAPES[model]
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(E, 2 * N, H, device=dev, generator=g) * 0.02).bfloat16()
        w2 = (torch.randn(E, H, N, device=dev, generator=g) * 0.02).bfloat16()
        table = {}
        for T in tokens:
            # Each case may use its share of what is left, so a slow case does not starve the rest.
            left = args.budget_s - (time.perf_counter() - start)
            r = tune_case(E, H, N, K, T, w13, w2, args.rep_ms, time.perf_counter() + left / (cases - done))
            done += 1
            results.append((model, r))
            table[str(T)] = config_entry(r["entry"])
        path = args.out_dir / config_file_name(E, N, device_name)
        path.write_text("{\n" + ",\n".join(f' "{t}": {json.dumps(c)}' for t, c in table.items()) + "\n}\n")
        print(f"{model}: wrote {path} at {time.perf_counter() - start:.0f} s", flush=True)
        del w13, w2
    print(f"{'model':18} {'tokens':>6} {'now ms':>8} {'plain ms':>8} {'new ms':>8} {'TFLOP/s':>8}  chosen")
    for model, r in results:
        won = r["new"] if r["new"] and tuple(r["chosen"]) == r["new"]["config"] else r["plain"]
        print(f"{model:18} {r['tokens']:>6} {r['current']['ms']:>8} {r['plain']['ms']:>8} "
              f"{(r['new'] or {}).get('ms', '-'):>8} {won['tflops']:>8}  {r['chosen']}")

if __name__ == "__main__":
    main()
