#!/usr/bin/env bash
# Llama 4 / NVFP4 GPU session, step 1: the new kernels' tests on the GPU, the NVFP4 GEMM timings, and per-step
# profiles of dummy Scout FP8 at several batch sizes from one model load. Results in $OUT.
#   bash benchmarks/gpu_scout_tune_run.sh        (BATCHES=1,64,256 QUANT=fp8 TESTS=1 NVFP4_BENCH=1)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:src
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_nvfp4_gemm.py tests/kernels/test_fused_moe.py \
      tests/kernels/test_rope_kv.py tests/layers/test_nvfp4.py > "$OUT/gpu_tests.log" 2>&1
  tail -4 "$OUT/gpu_tests.log"
fi
if [ "${NVFP4_BENCH:-1}" = 1 ]; then
  timeout 180 python3 benchmarks/nvfp4_gemm_bench.py > "$OUT/nvfp4_bench.log" 2>&1; tail -22 "$OUT/nvfp4_bench.log"
fi
MODEL=${MODEL:-llama-4-scout} timeout ${PROFILE_TIMEOUT:-330} python3 benchmarks/profile_step.py "${BATCHES:-1,64,256}" auto \
    "${QUANT:-fp8}" > "$OUT/profile.log" 2>&1
grep -E "GPU memory|KV cap|Error|error|step_wall|busy_ms|idle_ms|kernels_per|\"(moe|gemm|attention|norm|other|copies|activation|sampling)\"" \
    "$OUT/profile.log" | head -60
