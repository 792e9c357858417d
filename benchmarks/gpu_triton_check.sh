#!/usr/bin/env bash
# GPU check of the Triton backend: kernel tests on CUDA (bf16, fresh random inputs), model parity and an 8B smoke
# for both backends, then bench latency (batch 1) and bench throughput with the Triton backend. Results in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
python3 -m pytest -q tests/kernels 2>&1 | tail -5 | tee "$OUT/kernel_tests.txt"
for b in triton torch; do python3 benchmarks/gpu_smoke.py $b 2>&1 | grep -v INFO | tail -12; done
M="--model llama-3.1-8b --load-format dummy --kv_cache_free_gpu_memory_fraction 0.5 --max-seq-len 4096"
python3 -m llamaserve bench latency $M --input-len 128 --output-len 64 --batch-size 1 --num-iters 2 \
    --output-json "$OUT/latency_b1.json" 2>&1 | grep -A4 decode_step
python3 -m llamaserve bench throughput $M --input-len 128 --output-len 128 --num-prompts 256 \
    --output-json "$OUT/throughput_256.json" 2>&1 | grep -E "elapsed|output_tokens_per|preempt"
