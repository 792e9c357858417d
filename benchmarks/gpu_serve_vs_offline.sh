#!/usr/bin/env bash
# Serving overhead on dummy Llama-3.1-8B FP8 (FP8 KV): `bench serve` at concurrency C against `llamaserve serve`,
# then offline `bench throughput` with the batch capped at C, same 1024/1024 workload and prompt count.
# Needs the server's wheels on PYTHONPATH. Results in $OUT.   bash benchmarks/gpu_serve_vs_offline.sh [C] [N]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:src
C=${1:-256}; N=${2:-512}
E="--load-format dummy --quantization fp8 --kv-cache-dtype fp8 --max-seq-len 2304 --max-batch-size $C"
python3 -m llamaserve serve llama-3.1-8b $E --port 8125 > "$OUT/server.log" 2>&1 &
SERVER=$!
for i in $(seq 300); do curl -sf localhost:8125/health >/dev/null && break; sleep 1; done
python3 -m llamaserve bench serve --port 8125 --tokenizer llama-3.1-8b --random-input-len 1024 \
    --random-output-len 1024 --num-prompts $N --max-concurrency $C --ignore-eos --disable-tqdm \
    --save-result --result-dir "$OUT" --result-filename serve_c$C.json > "$OUT/bench_serve.txt" 2>&1 &
CLIENT=$!
sleep 25; top -b -n 1 -w 200 | head -20 > "$OUT/top.txt"  # who is busy mid-run: server, engine, client
wait $CLIENT; tail -30 "$OUT/bench_serve.txt"; cat "$OUT/top.txt"
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
grep -E "KV capacity|captured" "$OUT/server.log" | head -3
python3 -m llamaserve bench throughput --model llama-3.1-8b $E --input-len 1024 --output-len 1024 \
    --num-prompts $N --output-json "$OUT/offline_c$C.json" 2>&1 | grep -E "elapsed|tokens_per"
