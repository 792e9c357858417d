#!/usr/bin/env bash
# GPU run of the FP8 path: kernel tests, FP8-vs-bf16 agreement, batch-1 decode latency and offline throughput of
# dummy Llama-3.1-8B with FP8 weights and FP8 KV cache, per-step profiles. Results in $OUT.
#   bash benchmarks/gpu_fp8_run.sh [num_prompts] [max_batch_size]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
N=${1:-1024}; MB=${2:-512}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/kernels tests/layers/test_fp8.py -k "not smollm2 and not dummy_fp8" 2>&1 | tail -3 \
    | tee "$OUT/kernel_tests.txt"
python3 benchmarks/gpu_fp8_check.py llama-3.1-8b 1024 2>&1 | tail -12
M="--model llama-3.1-8b --load-format dummy --quantization fp8 --kv-cache-dtype fp8"
python3 -m llamaserve bench latency $M --max-seq-len 4096 --input-len 128 --output-len 128 --batch-size 1 \
    --num-iters 3 --output-json "$OUT/latency_b1_fp8.json" 2>&1 | grep -E "captured|median|KV cap" | head -4
for b in 1 256; do python3 benchmarks/profile_step.py $b auto fp8 2>&1 | grep -E "step_wall|busy|idle"; done
python3 -m llamaserve bench throughput $M --max-seq-len 2048 --max-batch-size $MB --input-len 1000 \
    --output-len 1000 --num-prompts $N --output-json "$OUT/throughput_fp8_1000.json" 2>&1 \
    | grep -E "captured|KV cap|elapsed|tokens_per"
