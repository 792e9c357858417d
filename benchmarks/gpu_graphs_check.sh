#!/usr/bin/env bash
# GPU check of CUDA graphs: kernel + graph tests on CUDA, batch-1 decode with and without graphs, offline
# throughput and per-step profiles with graphs. Results in $OUT.  Run: bash benchmarks/gpu_graphs_check.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
python3 -m pytest -q tests/kernels 2>&1 | tail -3 | tee "$OUT/kernel_tests.txt"
M="--model llama-3.1-8b --load-format dummy --kv_cache_free_gpu_memory_fraction 0.5 --max-seq-len 4096"
for mode in graphs eager; do
  extra=""; [ $mode = eager ] && extra="--enforce-eager"
  python3 -m llamaserve bench latency $M $extra --input-len 128 --output-len 64 --batch-size 1 --num-iters 2 \
      --output-json "$OUT/latency_b1_$mode.json" 2>&1 | grep -E "captured|median" | head -3
done
python3 -m llamaserve bench throughput $M --input-len 128 --output-len 128 --num-prompts 256 \
    --output-json "$OUT/throughput_256.json" 2>&1 | grep -E "captured|elapsed|output_tokens_per"
for b in 1 64; do python3 benchmarks/profile_step.py $b 2>&1 | grep -E "step_wall|busy|idle|kernels_per"; done
