#!/usr/bin/env bash
# GPU run: kernel tests on CUDA, kernel micro-benchmarks against the ceilings (SWEEP=1 adds the launch sweep),
# per-step profiles of 8B FP8 at batch 1 and at batch 512 x 1536 context, batch-1 latency and 1000/1000 offline
# throughput of 8B FP8. Results in $OUT.   bash benchmarks/gpu_tune_run.sh [num_prompts]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
N=${1:-1024}
python3 -m pytest -q -rf tests/kernels tests/layers/test_fp8.py tests/layers/test_rotary_and_sampler.py \
    -k "not smollm2 and not dummy_fp8" > "$OUT/kernel_tests.txt" 2>&1; tail -3 "$OUT/kernel_tests.txt"
python3 benchmarks/kernels_bench.py > "$OUT/kernels_bench.txt" 2>&1; tail -c 1500 "$OUT/kernels_bench.txt"
python3 benchmarks/profile_step.py 1 auto fp8 2>&1 | grep -E "step_wall|busy|idle"
python3 benchmarks/profile_step.py 512 auto fp8 1536 2>&1 | grep -E "step_wall|busy|idle|attention|gemm"
M="--model llama-3.1-8b --load-format dummy --quantization fp8 --kv-cache-dtype fp8"
python3 -m llamaserve bench latency $M --max-seq-len 4096 --input-len 128 --output-len 128 --batch-size 1 \
    --num-iters 3 --output-json "$OUT/latency_b1_fp8.json" 2>&1 | grep -E "median" | head -4
python3 -m llamaserve bench throughput $M --max-seq-len 2048 --max-batch-size 512 --input-len 1000 \
    --output-len 1000 --num-prompts $N --output-json "$OUT/throughput_fp8_1000.json" 2>&1 \
    | grep -E "elapsed|tokens_per"
