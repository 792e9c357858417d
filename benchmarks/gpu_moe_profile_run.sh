#!/usr/bin/env bash
# Fused-MoE launch sweep on Scout shapes, then per-step profiles of dummy Scout FP8 at batch 1 and 64.
#   bash benchmarks/gpu_moe_profile_run.sh     (results in $OUT)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=${PYTHONPATH:-}:src
${MOE_BENCH:-true} && QUICK=${QUICK:-0} python3 benchmarks/moe_bench.py > "$OUT/moe_bench.log" 2>&1; tail -30 "$OUT/moe_bench.log"
for b in ${BATCHES:-1 64}; do
  MODEL=llama-4-scout python3 benchmarks/profile_step.py "$b" auto fp8 > "$OUT/profile_scout_b$b.log" 2>&1
  grep -v "^ *\[\|^ *\]" "$OUT/profile_scout_b$b.log" | tail -45
done
