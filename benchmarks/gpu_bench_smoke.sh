#!/usr/bin/env bash
# GPU smoke run of the benchmark tools (not a performance result): dummy Llama-3.1-8B bf16 behind
# `llamaserve serve`, a two-point `bench serve` sweep, `bench report`, then offline `bench throughput` and
# `bench latency`. Results land in $OUT (default ./out). Run from the repo root: bash benchmarks/gpu_bench_smoke.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
M=llama-3.1-8b
python3 -m llamaserve serve $M --load-format dummy --port 8124 --max-num-seqs 64 \
    --kv_cache_free_gpu_memory_fraction 0.5 > "$OUT/server.log" 2>&1 &
SERVER=$!
for i in $(seq 300); do curl -sf localhost:8124/health >/dev/null && break; sleep 1; done
python3 -m llamaserve bench serve --port 8124 --tokenizer $M --random-input-len 128 --random-output-len 64 \
    --concurrency-sweep 1,8 --multi-round 2 --ignore-eos --label llamaserve-ref --result-dir "$OUT/sweep" \
    --disable-tqdm 2>&1 | tee "$OUT/bench_serve.txt" | grep -E "Successful|Failed|Output token|Mean TPOT|Mean TTFT"
python3 -m llamaserve bench report "$OUT/sweep" -o "$OUT/report" | tail -3
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
python3 -m llamaserve bench throughput --model $M --load-format dummy --input-len 128 --output-len 64 \
    --num-prompts 64 --kv_cache_free_gpu_memory_fraction 0.5 --output-json "$OUT/throughput.json" 2>&1 | tail -14
python3 -m llamaserve bench latency --model $M --load-format dummy --input-len 128 --output-len 32 \
    --batch-size 1 --num-iters 2 --kv_cache_free_gpu_memory_fraction 0.5 --output-json "$OUT/latency.json" 2>&1 | tail -18
