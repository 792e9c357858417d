#!/usr/bin/env bash
# GPU run: kernel tests on CUDA, kernel benchmarks (small-batch FP8 linears: cuBLAS vs the Triton kernel),
# batch-1 decode latency of 8B and 70B FP8 with each small-batch FP8 kernel, and 8B FP8 1000/1000 throughput
# (also checks the KV sizing with the CUDA-graph pool reserved). Results in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
python3 -m pytest -q -rf tests/kernels tests/layers/test_fp8.py tests/layers/test_rotary_and_sampler.py \
    -k "not smollm2 and not dummy_fp8" > "$OUT/kernel_tests.txt" 2>&1; tail -3 "$OUT/kernel_tests.txt"
python3 benchmarks/kernels_bench.py > "$OUT/kernels_bench.txt" 2>&1; grep -E "hbm|linear|decode_attn_TB|prefill_attn_TF" "$OUT/kernels_bench.txt"
M="--model llama-3.1-8b --load-format dummy --quantization fp8 --kv-cache-dtype fp8"
for k in triton cublas; do
  LLAMASERVE_FP8_SMALL_M=$k python3 -m llamaserve bench latency $M --max-seq-len 4096 --input-len 128 \
      --output-len 128 --batch-size 1 --num-iters 3 --output-json "$OUT/latency_b1_fp8_$k.json" 2>&1 \
      | grep -E "GPU memory|median" | head -3
done
LLAMASERVE_FP8_SMALL_M=triton python3 -m llamaserve bench latency --model llama-3.3-70b --load-format dummy \
    --quantization fp8 --kv-cache-dtype fp8 --max-seq-len 2048 --input-len 128 --output-len 128 --batch-size 1 \
    --num-iters 2 --max-batch-size 8 --output-json "$OUT/latency_70b_b1_fp8_triton.json" 2>&1 | grep -E "median" | tail -1
python3 -m llamaserve bench throughput $M --max-seq-len 2048 --max-batch-size 512 --input-len 1000 \
    --output-len 1000 --num-prompts 1024 --output-json "$OUT/throughput_fp8_1000.json" 2>&1 \
    | grep -E "GPU memory|KV cache:|captured|elapsed|tokens_per"
