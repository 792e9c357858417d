#!/usr/bin/env bash
# GPU check of the Triton backend: kernel tests on CUDA (fresh random inputs), ceilings and attention kernels,
# model parity and an 8B smoke for both backends, then bench latency (batch 1) and bench throughput with the
# Triton backend (auto on CUDA). Results in $OUT.  Run: bash benchmarks/gpu_triton_check.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
git rev-parse --short HEAD 2>/dev/null > "$OUT/commit.txt"
python3 -m pytest -q tests/kernels 2>&1 | tail -3 | tee "$OUT/kernel_tests.txt"
python3 benchmarks/kernels_bench.py 2>&1 | tail -14
for b in triton torch; do python3 benchmarks/gpu_smoke.py $b 2>&1 | grep -E "rel_err|match|batch8"; done
M="--model llama-3.1-8b --load-format dummy --kv_cache_free_gpu_memory_fraction 0.5 --max-seq-len 4096"
python3 -m llamaserve bench latency $M --input-len 128 --output-len 64 --batch-size 1 --num-iters 2 \
    --output-json "$OUT/latency_b1.json" 2>&1 | grep -A4 decode_step
python3 -m llamaserve bench throughput $M --input-len 128 --output-len 128 --num-prompts 256 \
    --output-json "$OUT/throughput_256.json" 2>&1 | grep -E "elapsed|output_tokens_per|preempt"
