#!/usr/bin/env bash
# One device call (nvidia-h200): checks first, then timings; each phase its own process
# with its own time limit, so a failure leaves the other phases' results.
#   bash benchmarks/h200_engine_run.sh "tests engine:qwen3-30b-a3b:280 idle:qwen3-30b-a3b:1,64"
# saved:MODEL:SECONDS[/BATCHES] runs the engine phase on a seeded random checkpoint saved
# under /tmp (written first if absent; removed after, the disk holds one); tune:MODELS (comma-separated; TUNE_TOKENS,
# TUNE_BUDGET_S) tunes the MoE tiles and tile walks into engine/kernels/configs
# (later phases of the same call read them; they come back as $OUT/moe_configs.tar); attn times the
# prefill attention kernels (attn:quick without tile sweeps); tests:SECONDS[:PATHS] runs the gpu tests (of tests/engine, or of
# the comma-separated PATHS under it); engine:MODEL:SECONDS[/BATCHES] times decode steps on load-time random weights,
# fused:... the same with the decode fusions on (TANDEM_DECODE_FUSION=1); fusion:BATCHES times each decode fusion
# old against new (benchmarks/decode_fusion_bench.py).
# Results: $OUT/*.jsonl and logs (what the device tool brings back).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
for job in $1; do
  IFS=: read -r phase model arg <<<"$job"
  start=$(date +%s)
  case $phase in
    tests)  timeout "${model:-170}" python3 -m pytest -q -m gpu $(tr , '\n' <<<"${arg:-.}" | sed 's|^|tests/engine/|') -p no:cacheprovider \
              2>&1 | tail -25 | tee "$OUT/gpu_tests.log" ;;
    saved)  IFS=/ read -r budget batches <<<"$arg"
            timeout $((budget + 150)) python3 benchmarks/engine_bench.py engine --model "$model" --budget-s "$budget" \
              --batches "${batches:-1,8,64,256}" --checkpoint "/tmp/ckpt-$model" --out "$OUT/engine.jsonl" 2>&1 \
              | grep -v Warning | tail -12
            rm -rf "/tmp/ckpt-$model" ;;
    tune)   timeout $((${TUNE_BUDGET_S:-280} + 60)) python3 benchmarks/tune_moe.py --model "$model" \
              --budget-s "${TUNE_BUDGET_S:-280}" ${TUNE_TOKENS:+--tokens $TUNE_TOKENS} 2>&1 \
              | tee -a "$OUT/tune.log" | grep -v "^  " \
              | cut -c1-200; tar -C engine/kernels -cf "$OUT/moe_configs.tar" configs ;;
    attn)   timeout 200 python3 benchmarks/attention_bench.py --out "$OUT/attn.jsonl" ${model:+--quick} 2>&1 | cut -c1-300 | tail -14 ;;
    engine|fused) IFS=/ read -r budget batches <<<"$arg"
            TANDEM_DECODE_FUSION=$([ "$phase" = fused ] && echo 1 || echo 0) timeout $((budget + 60)) \
              python3 benchmarks/engine_bench.py engine --model "$model" --budget-s "$budget" \
              --batches "${batches:-1,8,64,256}" --out "$OUT/$phase.jsonl" 2>&1 | grep -v Warning | tail -12 ;;
    fusion) timeout 150 python3 benchmarks/decode_fusion_bench.py --batches "${model:-1,8,64}" --out "$OUT/fusion.jsonl" \
              2>&1 | cut -c1-400 | tail -40 ;;
    idle|profile) timeout 150 python3 benchmarks/engine_bench.py "$phase" --model "$model" --batches "$arg" \
              --out "$OUT/$phase.jsonl" 2>&1 | grep -v Warning | tail -8 ;;
    eager)  timeout $((arg + 60)) python3 benchmarks/engine_bench.py engine --eager --model "$model" \
              --budget-s "$arg" --batches 1,64 --out "$OUT/engine_eager.jsonl" 2>&1 | tail -6 ;;
    kernels) timeout 200 python3 benchmarks/engine_bench.py kernels --out "$OUT/kernels.jsonl" 2>&1 \
              | grep -E "rms_norm|rotary" | cut -c1-240 ;;
  esac
  echo "== $job: $(( $(date +%s) - start )) s"
done
