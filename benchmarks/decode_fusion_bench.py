"""The decode fusions, old against new, per kernel at batch 1, 8 and 64 on one GPU.

    python benchmarks/decode_fusion_bench.py [--batches 1,8,64] [--out FILE] [--smoke] [--rope-kv-only]

Each case times the separate launches the decoder layer ran before (old) and the fused
launch it runs now (new), at the real shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite,
inside a CUDA graph (triton.testing.do_bench_cudagraph, median), as the decode step
runs them: launch latency inside a graph is what the fusions remove. Cases:
  route+align  softmax top-k, the expert map + load count, the MoE's align (3 launches) | one
               launch (over 16 tokens: routing in one, the align in another)
  norm+router  add + RMSNorm, then the router matmul (DeepSeek: float32 copies) | one launch
  norm+qkv     add + RMSNorm, then the qkv projection | one launch
  gemv         a plain projection: cuBLAS | the GEMV kernel, with a tile sweep at batch 1
  rope+kv      rotary (Qwen3: with its qk-norm), then the paged-cache store of K and V (MLA:
               [latent | k_pe] as one entry, after a cat) | one launch; same: bitwise
The new column is empty where the fusion does not apply (more than 16 tokens). Each
record also says whether the outputs agree (ids exact, values by relative error).
--smoke: tiny shapes on CPU through the Triton interpreter, plain timing (checks the script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.records import emit, record_to  # noqa: E402

# model: (hidden, experts, top_k, renormalize, router logits dtype, projections (name, N, K, norm in front))
MODELS = {
    "qwen3-30b-a3b": (2048, 128, 8, True, None,
                      [("qkv", 5120, 2048, True), ("o_proj", 2048, 4096, False)]),
    "deepseek-v2-lite": (2048, 64, 6, False, torch.float32,
                         [("q_proj", 3072, 2048, True), ("kv_a_proj", 576, 2048, False),
                          ("o_proj", 2048, 2048, False), ("shared gate_up", 5632, 2048, False),
                          ("shared down", 2048, 2816, False)]),
}
# model: (q heads, kv heads, rope dims, V width (MLA: the latent), qk-norm, MLA)
ROPE = {"qwen3-30b-a3b": (32, 4, 128, 128, True, False), "deepseek-v2-lite": (16, 1, 64, 512, False, True)}
ROPE_SMOKE = {"qwen3-30b-a3b": (4, 2, 16, 16, True, False), "deepseek-v2-lite": (4, 1, 8, 32, False, True)}
SMOKE = {"qwen3-30b-a3b": (64, 16, 4, True, None, [("qkv", 96, 64, True), ("o_proj", 64, 128, False)]),
         "deepseek-v2-lite": (64, 8, 2, False, torch.float32, [("o_proj", 64, 64, False)])}


def bench_us(fn, smoke: bool) -> float:
    import triton
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sweep(run) -> dict:
    """run(config) timed for GEMV tiles (1, BLOCK_N, BLOCK_K, num_warps) at one row."""
    out = {}
    for bn in (2, 4, 8, 16, 32, 64):
        for bk, warps in ((256, 4), (1024, 8)):
            cfg = (1, bn, bk, warps)
            try:
                out[str(cfg)] = round(bench_us(lambda: run(cfg), False), 2)
            except Exception as e:   # a config that fails to compile must not end the run
                out[str(cfg)] = f"error: {e}"[:80]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rope-kv-only", action="store_true", help="only the rope+kv case (seconds, no tile sweeps)")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    record_to(args.out)
    import triton

    from engine.kernels.moe import _align_kernel, plan_alignment
    from engine.kernels.norm_linear import norm_linear_triton
    from engine.ops.norm import rms_norm
    from engine.ops.norm_linear import MAX_FUSED_TOKENS, norm_linear
    from engine.ops.router import softmax_topk, softmax_topk_physical, to_physical

    dev = "cpu" if args.smoke else "cuda"
    be = "triton"
    dt = torch.bfloat16
    torch.manual_seed(0)
    for model, (H, E, K, renorm, logits_dtype, projs) in (SMOKE if args.smoke else MODELS).items():
        log2phy, logcnt = torch.arange(E, device=dev)[:, None], torch.ones(E, dtype=torch.long, device=dev)
        load = torch.zeros(E, dtype=torch.long, device=dev)
        norm_w = (1 + torch.randn(H, device=dev) / 4).to(dt)
        gate = (torch.randn(E, H, device=dev) * 0.02).to(dt)
        for T in (int(b) for b in args.batches.split(",")):
            rope_kv(model, T, (ROPE_SMOKE if args.smoke else ROPE)[model], dev, dt, args.smoke)
            if args.rope_kv_only:
                continue
            fits = T <= MAX_FUSED_TOKENS
            h, res = torch.randn(T, H, device=dev).to(dt), torch.randn(T, H, device=dev).to(dt)
            logits = torch.randn(T, E, device=dev, dtype=logits_dtype or dt)
            out_dt = logits_dtype or torch.float32

            x_moe = h
            w13 = torch.empty(E, 2, H, device=dev, dtype=dt)     # only its shape is read (the tiles)

            def align(phys, a):
                n = phys.numel()
                _align_kernel[(1,)](phys.reshape(-1), n, E, a.sorted_ids, a.block_expert, a.cursor, a.max_blocks,
                                    BLOCK_M=a.config.block_m, BINS=triton.next_power_of_2(E + 1), CHUNK=1024,
                                    BCHUNK=64, num_warps=8)

            def route_old():
                w, ids = softmax_topk(logits, K, renorm, 1.0, out_dt, backend=be)
                phys = to_physical(ids, log2phy, logcnt, load, backend=be)
                a = plan_alignment(x_moe, w13, K)
                align(phys, a)
                return w, ids, phys, a

            def route_new():
                a = plan_alignment(x_moe, w13, K)
                w, ids, phys, filled = softmax_topk_physical(logits, K, renorm, log2phy, logcnt, load, 1.0, out_dt,
                                                             backend=be, alignment=a if fits else None)
                if filled is None:
                    align(phys, a)
                return w, ids, phys, a

            (_, _, p_old, a_old), (_, _, p_new, a_new) = route_old(), route_new()
            same = torch.equal(p_old, p_new) and torch.equal(a_old.cursor, a_new.cursor)
            emit(case="route+align", model=model, batch=T, launches="3 -> 1" if fits else "3 -> 2", same=same,
                 old_us=bench_us(route_old, args.smoke), new_us=bench_us(route_new, args.smoke))

            def router_old():
                x, r = rms_norm(h, norm_w, 1e-6, res, backend=be)
                return (F.linear(x.float(), gate.float()) if logits_dtype else F.linear(x, gate)), r, x

            def router_new():
                return norm_linear(h, gate, None, norm_w, 1e-6, res, True, logits_dtype, backend=be)

            emit(case="norm+router", model=model, batch=T,
                 launches="2 (DeepSeek 4: norm, two casts, matmul) -> 1" if fits else "unfused",
                 rel_err=rel(router_new()[0], router_old()[0]) if fits else None,
                 old_us=bench_us(router_old, args.smoke), new_us=bench_us(router_new, args.smoke) if fits else None,
                 sweep_us=sweep(lambda cfg: norm_linear_triton(h, gate, None, norm_w, 1e-6, res, True, logits_dtype,
                                                               config=cfg)) if T == 1 and not args.smoke else None)

            for i, (name, N, Kd, norm) in enumerate(projs):
                w = (torch.randn(N, Kd, device=dev) * 0.02).to(dt)
                x = torch.randn(T, Kd, device=dev).to(dt)
                r = torch.randn(T, Kd, device=dev).to(dt)
                nw = norm_w if Kd == H else (1 + torch.randn(Kd, device=dev) / 4).to(dt)

                def proj_old():
                    return F.linear(rms_norm(x, nw, 1e-6, r, backend=be)[0], w) if norm else F.linear(x, w)

                def proj_new():
                    return norm_linear(x, w, None, nw if norm else None, 1e-6, r if norm else None, backend=be)[0]

                mb = N * Kd * 2 / 1e6
                rec = dict(case=("norm+" if norm else "gemv ") + name, model=model, batch=T, n=N, k=Kd, weight_mb=mb,
                           old_us=bench_us(proj_old, args.smoke))
                rec["old_tbs"] = mb / rec["old_us"]          # MB per us = TB/s
                if fits:
                    rec.update(rel_err=rel(proj_new(), proj_old()), new_us=bench_us(proj_new, args.smoke))
                    rec["new_tbs"] = mb / rec["new_us"]
                    if T == 1 and i < 2 and not args.smoke:     # a tile sweep (compiles cost seconds each)
                        rec["sweep_us"] = sweep(lambda cfg: norm_linear_triton(
                            x, w, None, nw if norm else None, 1e-6, r if norm else None, config=cfg))
                emit(**rec)


def rope_kv(model: str, T: int, shape: tuple, dev: str, dt: torch.dtype, smoke: bool) -> None:
    """rotary + the cache store: the two launches (MLA: three, with the cat) | one."""
    from engine.ops.attention import KVWrite, write_kv, write_kv_pair
    from engine.ops.rotary import rotary
    hq, hk, d, dv, norm, mla = shape
    bs, blocks = 16, max(4, 2 * T)
    pos = torch.arange(T, device=dev) * 7 + 100
    slots = torch.randperm(blocks * bs, device=dev)[:T]
    freqs = torch.arange(4096, device=dev).float()[:, None] / (10000 ** (torch.arange(0, d, 2, device=dev) / d))
    cos, sin = freqs.cos(), freqs.sin()
    x = torch.randn(T, hq * d + hk * d + hk * dv, device=dev).to(dt)     # a fused projection's output
    q, k, v = x.split([hq * d, hk * d, hk * dv], -1)
    q, k, v = q.view(T, hq, d), k.view(T, hk, d), v.view(T, hk, dv)
    nw = ((1 + torch.randn(d, device=dev) / 4).to(dt), (1 + torch.randn(d, device=dev) / 4).to(dt)) if norm \
        else (None, None)
    caches = [torch.zeros(blocks, 2, bs, hk, d + dv if mla else d, device=dev, dtype=dt) for _ in range(2)]
    be = "triton"

    def old(c=caches[0]):
        qo, ko = rotary(pos, q, k, cos, sin, mla, *nw, 1e-6, backend=be)
        if mla:
            write_kv(c[:, 0], torch.cat([v, ko], -1), slots, bs, backend=be)
        else:
            write_kv_pair(c[:, 0], c[:, 1], ko, v, slots, bs, backend=be)
        return qo, ko

    def new(c=caches[1]):
        w = KVWrite(c[:, 0, ..., dv:], c[:, 0, ..., :dv], v, slots, bs) if mla else KVWrite(c[:, 0], c[:, 1], v, slots, bs)
        return rotary(pos, q, k, cos, sin, mla, *nw, 1e-6, write=w, backend=be)

    (qa, ka), (qb, kb) = old(), new()
    same = torch.equal(qa, qb) and torch.equal(ka, kb) and torch.equal(caches[0], caches[1])
    emit(case="rope+kv", model=model, batch=T, launches="3 (rope, cat, store) -> 1" if mla else "2 -> 1", same=same,
         old_us=bench_us(old, smoke), new_us=bench_us(new, smoke))


if __name__ == "__main__":
    main()
