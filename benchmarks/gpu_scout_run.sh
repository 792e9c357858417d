#!/usr/bin/env bash
# First GPU run of dummy Llama-4-Scout (FP8 weights incl. experts, FP8 KV) on one H200: batch-1 decode latency
# and a short offline throughput run. Results in $OUT.   bash benchmarks/gpu_scout_run.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
M="--model llama-4-scout --load-format dummy --quantization fp8 --kv-cache-dtype fp8 --max-seq-len 2048"
python3 -m llamaserve bench latency $M --input-len 128 --output-len 64 --batch-size 1 --num-iters 2 \
    --max-batch-size 128 --output-json "$OUT/scout_latency_b1.json" 2>&1 | grep -E "GPU memory|KV cap|captured|median|Error|error" | head -8
python3 -m llamaserve bench throughput $M --max-batch-size 128 --input-len 512 --output-len 512 --num-prompts 128 \
    --output-json "$OUT/scout_throughput.json" 2>&1 | grep -E "elapsed|tokens_per|Error|error" | head -6
