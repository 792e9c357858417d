#!/usr/bin/env bash
# Llama 4 Scout FP8 on one H200, step 2: fused-MoE kernel tests, the whole-MoE timing per batch against its floor
# (+ a decode split-K sweep), Scout per-step profiles and the batch-1 latency. Results in $OUT.
#   bash benchmarks/gpu_scout_tune2_run.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:src
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py > "$OUT/gpu_tests.log" 2>&1
tail -2 "$OUT/gpu_tests.log"
SWEEP=0 SPLIT_SWEEP=1 timeout 200 python3 benchmarks/moe_bench.py > "$OUT/moe_bench.log" 2>&1
grep -E "fused_moe|split sweep|Error" "$OUT/moe_bench.log"
MODEL=llama-4-scout timeout 300 python3 benchmarks/profile_step.py "${BATCHES:-1,64,256}" auto fp8 > "$OUT/profile.log" 2>&1
grep -E "Error|error|step_wall|busy_ms|\"(moe|gemm|attention|other)\"" "$OUT/profile.log" | head -40
