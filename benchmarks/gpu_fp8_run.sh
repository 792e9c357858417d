#!/usr/bin/env bash
# GPU run of the FP8 fast path on dummy Llama-3.1-8B (FP8 weights, FP8 KV cache): kernel and FP8 tests on CUDA,
# FP8-vs-bf16 agreement, overlap on/off agreement, batch-1 decode latency, per-step profiles, offline throughput
# at 1000/1000. Results in $OUT.   bash benchmarks/gpu_fp8_run.sh [num_prompts] [max_batch_size]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
N=${1:-1024}; MB=${2:-512}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/kernels tests/layers/test_fp8.py tests/layers/test_rotary_and_sampler.py \
    -k "not smollm2 and not dummy_fp8" 2>&1 | tail -3 | tee "$OUT/kernel_tests.txt"
python3 benchmarks/gpu_fp8_check.py llama-3.1-8b 1024 2>&1 | grep -E "agree|rel_err"
python3 benchmarks/gpu_overlap_check.py 2>&1 | grep -E "identical|lengths|seconds"
M="--model llama-3.1-8b --load-format dummy --quantization fp8 --kv-cache-dtype fp8"
python3 -m llamaserve bench latency $M --max-seq-len 4096 --input-len 128 --output-len 128 --batch-size 1 \
    --num-iters 3 --output-json "$OUT/latency_b1_fp8.json" 2>&1 | grep -E "median" | head -4
for b in 1 256; do python3 benchmarks/profile_step.py $b auto fp8 2>&1 | grep -E "step_wall|busy|idle"; done
python3 -m llamaserve bench throughput $M --max-seq-len 2048 --max-batch-size $MB --input-len 1000 \
    --output-len 1000 --num-prompts $N --output-json "$OUT/throughput_fp8_1000.json" 2>&1 \
    | grep -E "captured|KV cap|elapsed|tokens_per"
