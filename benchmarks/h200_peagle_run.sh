#!/usr/bin/env bash
# One device call (nvidia-h200) for P-EAGLE: the gpu tests of speculation and of its step
# kernels, then a target and its head trained and measured (benchmarks/train_peagle.py),
# then the kernels of a K=7 step against a plain one (benchmarks/spec_step_profile.py).
#   bash benchmarks/h200_peagle_run.sh [TARGET_S HEAD_S MEASURE_S]
# Each phase has its own time limit, so a failure leaves the others' results in $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
start=$(date +%s)
phase() { echo "== $1: $(( $(date +%s) - start )) s"; start=$(date +%s); }
timeout 100 python3 -m pytest -q -m gpu tests/engine/spec tests/engine/kernels/test_spec_inputs_kernels.py \
  -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/spec_gpu_tests.log"
phase tests
timeout $(( ${1:-70} + ${2:-90} + ${3:-120} + 90 )) python3 benchmarks/train_peagle.py --target-s "${1:-70}" \
  --head-s "${2:-90}" --measure-s "${3:-120}" --out "$OUT/peagle.jsonl" 2>&1 | grep '^{' | cut -c1-400
phase train+measure
timeout 60 python3 benchmarks/spec_step_profile.py --dir /tmp/peagle --ks 7 0 --batches 1 \
  --out "$OUT/spec_profile.jsonl" 2>&1 | grep '^{' | cut -c1-300
phase profile
