#!/usr/bin/env bash
# Llama 4 Scout FP8 batch-1 decode on one H200: the decode-MoE / norm kernel tests, the decode-MoE launch sweep and
# whole-step timing against the grouped path (moe_bench DECODE=1), then Scout's batch-1 (and 16) decode step, timed
# and profiled (profile_step.py). Results in $OUT.
#   bash benchmarks/gpu_scout_decode_run.sh [BATCHES]     # BATCHES "1,16" by default; SKIP_BENCH=1 skips moe_bench
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moe_decode.py tests/kernels/test_fused_moe.py \
    tests/kernels/test_norm_act.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  DECODE=1 timeout 240 python3 benchmarks/moe_bench.py > "$OUT/moe_bench.log" 2>&1
  grep -E "decode|Error" "$OUT/moe_bench.log" | cut -c1-600
fi
MODEL=llama-4-scout timeout 280 python3 benchmarks/profile_step.py "${1:-1,16}" auto fp8 > "$OUT/profile.log" 2>&1
grep -E "Error|error|step_wall|busy_ms|idle_ms|kernels_per|\"(moe|gemm|attention|other|norm|copies|activation)\"" \
    "$OUT/profile.log" | head -40
