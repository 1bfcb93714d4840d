"""Tune the fused MoE tiles on this GPU and write them as the data files the kernel reads
(engine/kernels/moe_configs.py), vLLM-style: one file per (experts, intermediate size,
device), keys token counts, values the fastest tiles at that count.

    python benchmarks/tune_moe.py [--model deepseek-v2-lite,qwen3-30b-a3b] [--tokens 1,8,...]
                                  [--out-dir engine/kernels/configs] [--rep-ms 25]

Routing is random (softmax of Gaussian logits, top-k), so every expert sees about the
same load, as in the engine's prefill on random prompts. Each candidate is checked
against the first one's output (a config that miscomputes is dropped, not chosen) and
timed with triton.testing.do_bench (median). The candidates per count are a small grid
around what the count's regime needs: streaming weights at decode sizes (few rows per
expert), matrix-bound tiles at prefill sizes.
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


def candidates(rows_per_expert: float):
    from engine.kernels.moe import MoEConfig
    if rows_per_expert <= 8:
        grid = itertools.product([16], [32, 64, 128], [128, 256], [4], [3, 4])
    elif rows_per_expert <= 64:
        grid = itertools.product([32, 64], [64, 128], [64, 128], [4], [3, 4])
    else:
        grid = itertools.product([64, 128], [128, 256], [64], [4, 8], [3, 4])
    return [MoEConfig(*c) for c in grid]


def tune(E: int, H: int, N: int, K: int, tokens: list[int], rep_ms: float) -> dict[str, dict]:
    import triton
    from engine.kernels.moe import fused_moe_triton, moe_config
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(E, 2 * N, H, device=dev, generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(E, H, N, device=dev, generator=g) * 0.02).bfloat16()
    table = {}
    for T in tokens:
        x = torch.randn(T, H, device=dev, generator=g).bfloat16()
        w, ids = torch.randn(T, E, device=dev, generator=g).softmax(-1).topk(K, dim=-1)
        w = w.bfloat16()
        ref = fused_moe_triton(x, w13, w2, ids, w, candidates(T * K / E)[0]).float()
        timings = {}
        for c in candidates(T * K / E):
            try:
                out = fused_moe_triton(x, w13, w2, ids, w, c).float()
                if ((out - ref).norm() / ref.norm()).item() > 1e-2:
                    continue
                timings[c] = triton.testing.do_bench(lambda: fused_moe_triton(x, w13, w2, ids, w, c),
                                                     warmup=5, rep=rep_ms, return_mode="median")
            except Exception as e:    # out of shared memory, say: not a candidate here
                print(f"  {tuple(c)}: {type(e).__name__}", flush=True)
        best = min(timings, key=timings.get)
        before = triton.testing.do_bench(lambda: fused_moe_triton(x, w13, w2, ids, w, moe_config(T, K, E, N, dev)),
                                         warmup=5, rep=rep_ms, return_mode="median")
        flops = 2 * T * K * 3 * H * N
        print(json.dumps(dict(E=E, N=N, tokens=T, best=tuple(best), best_ms=round(timings[best], 4),
                              tflops=round(flops / timings[best] / 1e9, 1), current_ms=round(before, 4),
                              candidates=len(timings))), flush=True)
        table[str(T)] = dict(BLOCK_SIZE_M=best.block_m, BLOCK_SIZE_N=best.block_n, BLOCK_SIZE_K=best.block_k,
                             num_warps=best.num_warps, num_stages=best.num_stages)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "engine" / "kernels" / "configs")
    ap.add_argument("--rep-ms", type=float, default=25)
    args = ap.parse_args()
    from engine.kernels.moe_configs import config_file_name
    tokens = [int(t) for t in args.tokens.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for model in args.model.split(","):
        E, H, N, K = SHAPES[model]
        t0 = time.perf_counter()
        table = tune(E, H, N, K, tokens, args.rep_ms)
        path = args.out_dir / config_file_name(E, N, torch.cuda.get_device_name())
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"{model}: wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
