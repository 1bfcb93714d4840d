#!/usr/bin/env bash
# NemotronH on one H200 (nvidia-h200), one device call per job list: copy bandwidth, the
# gpu-marked Mamba / NemotronH / squared-ReLU MoE / hybrid P-EAGLE tests, then the engine and transformers
# at the Nano and Super-width shapes (random bf16 weights). Each phase is its own process
# with its own time limit, so a failure leaves the other phases' results.
#   bash benchmarks/h200_nemotron_run.sh "copy tests:240 engine:nano:200 engine:super:200"
#   bash benchmarks/h200_nemotron_run.sh "hf:nano:120 hf:super:120"
# nano = nemotron-3-nano-30b-a3b, super = nemotron-3-super-width-random-depth18.
# Results in $OUT: engine.jsonl, hf.jsonl, copy.jsonl (one JSON line each), gpu_tests.log.
# Engine: decode step at batch 1, 8, 64, 256 and prefill tok/s (1024-token prompts, step =
# (T(256 new) - T(1 new)) / 255), CUDA graphs and async scheduling on (the CUDA defaults),
# each line with its decode floor (weights + touched experts + attention KV + Mamba state
# read and written) at the copy bandwidth measured in the same process.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
date -u +"%Y-%m-%d %H:%M:%S UTC"
# Run from a `git archive` of a commit (a COMMIT file beside it) or from a checkout.
if [ -f COMMIT ]; then echo "code $(cat COMMIT)"; else git log -1 --format="code %h %s" 2>/dev/null; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
declare -A MODEL=([nano]=nemotron-3-nano-30b-a3b [super]=nemotron-3-super-width-random-depth18)
for job in $1; do
  IFS=: read -r phase name arg <<<"$job"
  model=${MODEL[${name:-nano}]:-$name}
  start=$(date +%s)
  case $phase in
    copy)   timeout 60 python3 benchmarks/engine_bench.py copy --out "$OUT/copy.jsonl" 2>&1 | grep copy ;;
    tests)  timeout "${name:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
              tests/engine/kernels/test_mamba_kernels.py tests/engine/test_nemotron_h.py \
              tests/engine/kernels/test_moe_kernels.py tests/engine/spec/test_hybrid_spec.py 2>&1 | grep -v Warning | tail -40 | tee "$OUT/gpu_tests.log" ;;
    engine) timeout $((arg + 90)) python3 benchmarks/engine_bench.py engine --model "$model" --budget-s "$arg" \
              --batches "${BATCHES:-1,8,64,256}" --out "$OUT/engine.jsonl" 2>&1 | grep -v Warning | tail -12 ;;
    hf)     timeout $((arg + 120)) python3 benchmarks/engine_bench.py hf --model "$model" --budget-s "$arg" \
              --batches 1,8 --new-tokens "${HF_NEW:-16}" --out "$OUT/hf.jsonl" 2>&1 | grep -v -i "warn\|falling back" | tail -8 ;;
  esac
  echo "== $job: $(( $(date +%s) - start )) s"
done
