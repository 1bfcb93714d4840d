#!/usr/bin/env bash
# One device call (nvidia-h200-x2): the EP checks first, then the timings; each phase
# its own process with its own time limit, so a failure leaves the others' results.
#   bash benchmarks/h200x2_ep_run.sh "tests dispatch engine"
# Results: $OUT/*.json and logs (what the device tool brings back).
set -u
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, zmq, msgpack; print(torch.__version__, triton.__version__, torch.cuda.device_count())"
SHAPE="--experts 128 --hidden 2048 --inter 768 --topk 8"     # Qwen3-30B-A3B's MoE layer
for phase in $1; do
  start=$(date +%s)
  case $phase in
    tests)    timeout 240 python3 -m pytest -q -m gpu tests/eplb tests/engine/kernels/test_moe_kernels.py \
                -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.log" ;;
    dispatch) timeout 200 python3 benchmarks/ep_bench.py --device cuda --ranks 2 $SHAPE --dtype bfloat16 \
                --tokens 1 16 64 128 256 512 --modes comm moe ll ll-graph --ll-capacity 512 \
                --json "$OUT/ep_dispatch.json" 2>&1 | grep -v Warning | tail -30 ;;
    engine)   timeout 330 python3 benchmarks/ep_bench.py --device cuda --skip-dispatch --rebalance \
                --engine-ranks 2 --engine-experts 128 --engine-layers 16 --engine-hidden 2048 \
                --engine-inter 768 --topk 8 --engine-batch 1 64 --engine-dispatch low_latency normal \
                --ll-capacity 256 --iters 20 --json "$OUT/ep_engine.json" 2>&1 | grep -v Warning | tail -20 ;;
  esac
  echo "== $phase: $(( $(date +%s) - start )) s"
done
