#!/usr/bin/env bash
# GPU run: kernel and CUDA-graph tests on CUDA, batch-1 decode latency of 8B FP8 at a short (128) and a long
# (3,000-token) prompt, 70B FP8 batch-1 latency, batch-1 profile. Results in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
python3 -m pytest -q -rf tests/kernels > "$OUT/kernel_tests.txt" 2>&1; tail -3 "$OUT/kernel_tests.txt"
M="--model llama-3.1-8b --load-format dummy --quantization fp8 --kv-cache-dtype fp8"
for isl in 128 3000; do
  python3 -m llamaserve bench latency $M --max-seq-len 4096 --input-len $isl --output-len 128 --batch-size 1 \
      --num-iters 3 --output-json "$OUT/latency_b1_fp8_in$isl.json" 2>&1 | grep -E "captured|median" | head -3
done
python3 -m llamaserve bench latency --model llama-3.3-70b --load-format dummy --quantization fp8 \
    --kv-cache-dtype fp8 --max-seq-len 2048 --input-len 128 --output-len 128 --batch-size 1 --num-iters 2 \
    --max-batch-size 8 --output-json "$OUT/latency_70b_b1_fp8.json" 2>&1 | grep -E "median" | tail -1
python3 benchmarks/profile_step.py 1 auto fp8 2>&1 | grep -E "step_wall|busy|idle|attention|gemm"
