#!/usr/bin/env bash
# GPU run of dummy Llama-3.3-70B with FP8 weights and FP8 KV cache on one H200: batch-1 decode latency and
# offline 1000/1000 throughput. Results in $OUT.   bash benchmarks/gpu_70b_run.sh [num_prompts] [max_batch_size]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
N=${1:-320}; MB=${2:-160}
M="--model llama-3.3-70b --load-format dummy --quantization fp8 --kv-cache-dtype fp8"
python3 -m llamaserve bench latency $M --max-seq-len 2048 --input-len 128 --output-len 128 --batch-size 1 \
    --num-iters 2 --max-batch-size 8 --output-json "$OUT/latency_70b_b1_fp8.json" 2>&1 | grep -E "KV cap|median" | head -4
python3 -m llamaserve bench throughput $M --max-seq-len 2048 --max-batch-size $MB --input-len 1000 \
    --output-len 1000 --num-prompts $N --output-json "$OUT/throughput_70b_fp8_1000.json" 2>&1 \
    | grep -E "captured|KV cap|elapsed|tokens_per|preempt"
