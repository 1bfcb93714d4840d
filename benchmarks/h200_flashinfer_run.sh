#!/usr/bin/env bash
# One device call (nvidia-h200) for the FLASHINFER attention backend; flashinfer-python
# and apache-tvm-ffi travel as wheels in .whl (carry it), installed first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/h200_flashinfer_run.sh
# Phases, each with its own time limit: JIT-compile the one kernel module the backend uses
# (FA2 paged prefill, bf16, head dim 128, sm_90a only), the gpu tests of the backend, the
# attention benchmark's GQA cases (Triton, SDPA, FlashInfer). The compiled module comes
# back as $OUT/flashinfer_ops.tgz (split in 15 MiB parts if larger): put it in .whl and a
# later call loads it as FlashInfer's AOT module instead of compiling.
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-16}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
phase() { echo "== $1: $(( $(date +%s) - start )) s"; start=$(date +%s); }
start=$(date +%s)
AOT=$(python3 -c "import flashinfer.jit.env as e; print(e.FLASHINFER_AOT_DIR)") || { echo "flashinfer does not import"; exit 1; }
JIT=$(python3 -c "import flashinfer.jit.env as e; print(e.FLASHINFER_JIT_DIR)")
if ls .whl/flashinfer_ops.tgz* >/dev/null 2>&1; then
  mkdir -p "$AOT" && cat .whl/flashinfer_ops.tgz* | tar -C "$AOT" -xzf - && echo "carried modules: $(ls "$AOT")"
fi
python3 -c "import torch, flashinfer, tvm_ffi; print(torch.__version__, torch.version.cuda, 'flashinfer', flashinfer.__version__, 'tvm_ffi', tvm_ffi.__version__)"
phase install
timeout 200 python3 - <<'PY' 2>&1 | tail -8
import time, torch
from engine.layers.flashinfer_attention import FlashInferAttention
from tests.engine.kernels.cases import attention_case
q, k, v, meta = attention_case([(0, 9), (20, 1)], 16, 4, 128, 128, 16, False, torch.bfloat16, "cuda")
t = time.time()
layer = type("Layer", (), {"num_heads": 16, "num_kv_heads": 4, "head_dim": 128, "scale": 128 ** -0.5})
FlashInferAttention(layer, 16, meta.block_table.shape[1], torch.bfloat16, q.device).attend(q, k, v, meta)
torch.cuda.synchronize()
print(f"FlashInfer module ready in {time.time() - t:.1f} s")
PY
phase compile
timeout 150 python3 -m pytest -q -m gpu tests/engine/test_flashinfer_gpu.py -p no:cacheprovider 2>&1 | tail -25 \
  | tee "$OUT/flashinfer_tests.log"
phase tests
timeout 70 python3 benchmarks/attention_bench.py --quick --only gqa --out "$OUT/attn_flashinfer.jsonl" 2>&1 \
  | cut -c1-300 | tail -10
phase bench
if [ -d "$JIT" ]; then
  (cd "$JIT" && tar -czf "$OUT/flashinfer_ops.tgz" $(ls -d */*.so 2>/dev/null))
  [ "$(stat -c %s "$OUT/flashinfer_ops.tgz")" -gt $((15 << 20)) ] && split -b 15M -d "$OUT/flashinfer_ops.tgz" \
    "$OUT/flashinfer_ops.tgz." && rm "$OUT/flashinfer_ops.tgz"
  ls -la "$OUT"
fi
