"""Prefill attention kernels alone on one GPU, at the real shapes: the engine's Triton
kernels (tile sweeps included) against torch's SDPA (cuDNN / flash), TFLOP/s against
the matrix ceiling.

    python benchmarks/attention_bench.py [--out FILE] [--quick]

Cases (bf16, causal, B prompts of 1024 new tokens):
- MLA, DeepSeek-V2-Lite (16 heads): the absorbed form over the latent cache (q/k 576,
  v 512, one KV head) against the expanded form over decompressed K/V (q/k 192, v 128,
  16 KV heads): packed Triton and SDPA, plus the kv_b up-projection the expansion costs;
- GQA, Qwen3-30B-A3B (32 query / 4 KV heads, d 128): the paged Triton kernel and its
  tile sweep against SDPA on the same K/V packed, and FlashInfer's paged prefill (the
  FLASHINFER backend) on the same paged cache where flashinfer imports;
- GQA decode at the same shape (B requests, one query over 1024 cached tokens): the
  Triton kernel against FlashInfer (TB/s of K/V read; `--only gqa` runs the GQA cases).
TFLOP/s counts the causal half: B x heads x T^2/2 x 2 x (d_qk + d_v). Errors are
||out - ref|| / ||ref|| against a float64 dense reference of the first two prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.records import emit, record_to  # noqa: E402


def bench(fn) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(B: int, T: int, heads: int, dqk: int, dv: int, ms: float) -> float:
    return B * heads * T * T / 2 * 2 * (dqk + dv) / ms / 1e9


def err_first_two(out: torch.Tensor, q, k, v, T: int, scale: float) -> float:
    from tests.engine.kernels.test_packed_attention import dense_ref
    n = 2 * T
    ref = dense_ref(q[:n], k[:n], v[:n], [(0, T)] * 2, scale)
    return ((out[:n].double() - ref).norm() / ref.norm()).item()


def mla_cases(B: int, T: int, sweep: bool) -> None:
    from engine.kernels.attention import AttnConfig, paged_attention_triton
    from engine.ops.packed_attention import packed_attention
    from tests.engine.kernels.cases import attention_case
    from tests.engine.kernels.test_packed_attention import packed_case
    H, scale = 16, 192 ** -0.5
    q, kc, vc, meta = attention_case([(0, T)] * B, H, 1, 576, 512, 16, True, torch.bfloat16, "cuda")
    ms = bench(lambda: paged_attention_triton(q, kc, vc, meta, 576 ** -0.5))
    emit(case="mla-absorbed", batch=B, tokens=T, impl="triton paged", ms=ms, tflops=tflops(B, T, H, 576, 512, ms))
    q, k, v, pmeta = packed_case([(0, T)] * B, H, H, 192, 128, torch.bfloat16, "cuda")
    for impl in ("sdpa", "triton"):
        out = packed_attention(q, k, v, pmeta, scale, impl=impl)
        ms = bench(lambda: packed_attention(q, k, v, pmeta, scale, impl=impl))
        emit(case="mla-expanded", batch=B, tokens=T, impl=impl, ms=ms, tflops=tflops(B, T, H, 192, 128, ms),
             rel_err=err_first_two(out, q, k, v, T, scale))
    vc_ = v.contiguous()
    ms = bench(lambda: packed_attention(q, k, vc_, pmeta, scale, impl="sdpa"))
    emit(case="mla-expanded", batch=B, tokens=T, impl="sdpa, contiguous v", ms=ms, tflops=tflops(B, T, H, 192, 128, ms))
    lat = torch.randn(B * T, 512, device="cuda").bfloat16()
    w = torch.randn(H * 256, 512, device="cuda").bfloat16() * 0.02
    ms = bench(lambda: torch.nn.functional.linear(lat, w))
    emit(case="mla-expand-projection", batch=B, tokens=T, impl="kv_b linear", ms=ms,
         tflops=2 * B * T * 512 * H * 256 / ms / 1e9)
    if sweep:
        kc4, vc4 = k.unsqueeze(1), v.unsqueeze(1)
        res = {}
        for c in [AttnConfig(r, n, w_, s) for r in (64, 128) for n in (32, 64) for w_ in (4, 8) for s in (2, 3)]:
            try:
                res[str(tuple(c))] = round(bench(lambda: paged_attention_triton(q, kc4, vc4, pmeta, scale, c)), 4)
            except Exception as e:
                res[str(tuple(c))] = f"error: {type(e).__name__}"
        emit(case="mla-expanded-sweep", batch=B, tokens=T, sweep=res)


def flashinfer_run(q, kc, vc, meta, scale: float) -> dict:
    """The FLASHINFER backend on the engine's paged cache (planned once, as a step does):
    {ms, rel_err_vs_triton}, or {skipped: why} where flashinfer does not import."""
    from engine.kernels.attention import paged_attention_triton
    from engine.layers.flashinfer_attention import FlashInferAttention, import_problem
    from tests.engine.kernels.cases import rel_err
    if import_problem() is not None:
        return {"skipped": import_problem()}
    layer = type("Layer", (), dict(num_heads=q.shape[1], num_kv_heads=kc.shape[2], head_dim=q.shape[2], scale=scale))
    fi = FlashInferAttention(layer, meta.block_size, meta.block_table.shape[1], q.dtype, q.device)
    out = fi.attend(q, kc, vc, meta)
    return {"ms": bench(lambda: fi.attend(q, kc, vc, meta)),
            "rel_err_vs_triton": rel_err(out, paged_attention_triton(q, kc, vc, meta, scale).float())}


def gqa_decode_cases(B: int, ctx: int) -> None:
    from engine.kernels.attention import paged_attention_triton
    from tests.engine.kernels.cases import attention_case
    HQ, HKV, D, scale = 32, 4, 128, 128 ** -0.5
    q, kc, vc, meta = attention_case([(ctx - 1, 1)] * B, HQ, HKV, D, D, 16, False, torch.bfloat16, "cuda")
    kv_bytes = B * ctx * HKV * D * 2 * 2
    ms = bench(lambda: paged_attention_triton(q, kc, vc, meta, scale))
    emit(case="gqa-decode", batch=B, context=ctx, impl="triton paged", ms=ms, tbps=kv_bytes / ms / 1e9)
    r = flashinfer_run(q, kc, vc, meta, scale)
    emit(case="gqa-decode", batch=B, context=ctx, impl="flashinfer paged", **r,
         **({"tbps": kv_bytes / r["ms"] / 1e9} if "ms" in r else {}))


def gqa_cases(B: int, T: int, sweep: bool) -> None:
    from engine.kernels.attention import AttnConfig, paged_attention_triton
    from engine.ops.packed_attention import packed_attention_sdpa
    from tests.engine.kernels.cases import attention_case
    from tests.engine.kernels.test_packed_attention import packed_case
    HQ, HKV, D, scale = 32, 4, 128, 128 ** -0.5
    qp, kc, vc, meta = attention_case([(0, T)] * B, HQ, HKV, D, D, 16, False, torch.bfloat16, "cuda")
    ms = bench(lambda: paged_attention_triton(qp, kc, vc, meta, scale))
    emit(case="gqa", batch=B, tokens=T, impl="triton paged (default tiles)", ms=ms, tflops=tflops(B, T, HQ, D, D, ms))
    q, k, v, pmeta = packed_case([(0, T)] * B, HQ, HKV, D, D, torch.bfloat16, "cuda")
    v = v.contiguous()
    out = packed_attention_sdpa(q, k, v, pmeta, scale)
    ms = bench(lambda: packed_attention_sdpa(q, k, v, pmeta, scale))
    emit(case="gqa", batch=B, tokens=T, impl="sdpa packed", ms=ms, tflops=tflops(B, T, HQ, D, D, ms),
         rel_err=err_first_two(out, q, k, v, T, scale))
    r = flashinfer_run(qp, kc, vc, meta, scale)
    emit(case="gqa", batch=B, tokens=T, impl="flashinfer paged", **r,
         **({"tflops": tflops(B, T, HQ, D, D, r["ms"])} if "ms" in r else {}))
    if sweep:
        res = {}
        configs = [AttnConfig(128, n, w_, s) for n in (64, 128) for w_ in (4, 8) for s in (2, 3, 4)]
        configs += [AttnConfig(64, 64, 4, 3), AttnConfig(64, 128, 4, 3), AttnConfig(256, 64, 8, 2)]
        for c in configs:
            try:
                res[str(tuple(c))] = round(bench(lambda: paged_attention_triton(qp, kc, vc, meta, scale, c)), 4)
            except Exception as e:
                res[str(tuple(c))] = f"error: {type(e).__name__}"
        best = min((v_, k_) for k_, v_ in res.items() if isinstance(v_, float))
        emit(case="gqa-sweep", batch=B, tokens=T, best=best[1], best_ms=best[0],
             best_tflops=tflops(B, T, HQ, D, D, best[0]), sweep=res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="no tile sweeps")
    ap.add_argument("--only", choices=("mla", "gqa"), help="one family of cases")
    args = ap.parse_args()
    record_to(args.out)
    p = torch.cuda.get_device_properties(0)
    emit(device=p.name, torch=torch.__version__, triton=__import__("triton").__version__)
    torch.manual_seed(0)
    if args.only != "gqa":
        for B in (8, 16):
            mla_cases(B, 1024, sweep=not args.quick and B == 16)
    if args.only != "mla":
        gqa_cases(8, 1024, sweep=not args.quick)
        for B in (1, 64):
            gqa_decode_cases(B, 1024)


if __name__ == "__main__":
    main()
