"""Compile the fused-MoE GEMMs for Hopper (sm_90) on a machine without a GPU and report
what came out: registers and spills (Triton's bundled ptxas), shared memory, and the
wgmma / TMA (cp.async.bulk.tensor) / cp.async instructions in the PTX.

    PYTHONPATH=.:/path/to/triton-3.6 python benchmarks/moe_sm90_compile.py [--quick]

It checks what the interpreter cannot: that every tile walk compiles with the Triton
the device runs, and whether the loads are pipelined (cp.async or TMA present, shared
memory of num_stages buffers) and the products on wgmma (absent below 64 rows a tile).
Pointer arguments carry Triton's 16-byte divisibility, as the JIT gives them at real
shapes (H = 2048, N = 1408 or 768).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels import moe  # noqa: E402

INDEX_ARRAYS = {"block_expert_ptr", "cursor_ptr", "sorted_ptr"}
NOT_SPECIALIZED = {"rows_per_peer", "max_blocks"}
TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (16, 64, 128, 4, 3)]
DOWN_TILES = [(128, 256, 64, 8, 3)]      # down_block_n = 256: w2 only (w13's two 256-wide tiles overflow)
WALKS = [(0, False, False, False), (8, False, False, True), (8, True, False, False), (8, True, True, False),
         (8, True, True, True)]      # (GROUP_M, PERSISTENT, FLATTEN, TMA)


def signature(kernel, tma: bool, block_n: int, block_k: int, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "w":
            sig[name] = f"tensordesc<bf16[{block_n}, {block_k}]>" if tma else "*bf16"
        elif name == "peer_ptrs":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INDEX_ARRAYS else "*bf16"
        else:
            sig[name] = "i32"
    return sig


def ptxas_report(ptx: str) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                       capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    return f"regs {','.join(regs)} spill-bytes {','.join(spills)}"


def compile_one(kernel, tile, walk, extra: dict) -> str:
    bm, bn, bk, warps, stages = tile
    group, persistent, flatten, tma = walk
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=False, GROUP_M=group, PERSISTENT=persistent,
                      FLATTEN=flatten, TMA=tma, **extra)
    sig = signature(kernel, tma, bn, bk, constexprs)
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if (t.startswith("*") or t == "i32") and n not in NOT_SPECIALIZED}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = k.asm["ptx"]
    count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
    return (f"{ptxas_report(ptx)} smem {k.metadata.shared} wgmma {count(r'wgmma.mma_async')} "
            f"tma {count(r'cp.async.bulk.tensor')} cp.async {count(r'cp.async.c[ag]')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the prefill tile only")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90")
    w13 = ("w13", moe._w13_kernel, dict(TOPK=6, GATED=True))
    w2 = ("w2", moe._w2_kernel, dict(TO_PEERS=False))
    jobs = [(tile, [w13, w2]) for tile in (TILES[:1] if args.quick else TILES)] + [(t, [w2]) for t in DOWN_TILES]
    for tile, kernels in jobs:
        for walk in WALKS:
            for name, kernel, extra in kernels:
                try:
                    report = compile_one(kernel, tile, walk, extra)
                except Exception as e:      # report it and go on with the others
                    report = f"FAILED {type(e).__name__}: {str(e)[-300:]}"
                print(f"{name:3} tiles {tile} walk (group, persistent, flatten, tma) {walk}: {report}", flush=True)


if __name__ == "__main__":
    main()
