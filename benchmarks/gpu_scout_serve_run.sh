#!/usr/bin/env bash
# Dummy Llama-4-Scout on one H200: `llamaserve serve` + `bench serve` 1024/1024 over a concurrency sweep (vLLM's
# Scout recipe workload), then the batch-1 decode latency offline. Needs the server's wheels on PYTHONPATH.
#   bash benchmarks/gpu_scout_serve_run.sh [QUANT] [SWEEP] [ROUNDS] [EXTRA SERVER FLAGS...]
#   QUANT fp8 (default) or nvfp4; SWEEP "1,4,16,64,128,256"; ROUNDS 2 (prompts per level = concurrency x ROUNDS)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:src
Q=${1:-fp8}; SWEEP=${2:-1,4,16,64,128,256}; ROUNDS=${3:-2}; shift 3 2>/dev/null || shift $#
MAXC=${SWEEP##*,}
E="--load-format dummy --quantization $Q --kv-cache-dtype fp8 --max-seq-len 2304 --max-batch-size $MAXC $*"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m llamaserve serve llama-4-scout $E --port 8125 > "$OUT/server_$Q.log" 2>&1 &
SERVER=$!
for i in $(seq 400); do curl -sf localhost:8125/health >/dev/null && break; sleep 1; done
grep -E "GPU memory|KV cap|captured" "$OUT/server_$Q.log" | head -4
timeout ${SERVE_TIMEOUT:-420} python3 -m llamaserve bench serve --port 8125 --tokenizer llama-4-scout \
    --random-input-len 1024 --random-output-len 1024 --concurrency-sweep "$SWEEP" --multi-round "$ROUNDS" \
    --ignore-eos --disable-tqdm --label "llamaserve-scout-$Q" --save-result --result-dir "$OUT" \
    > "$OUT/bench_serve_$Q.txt" 2>&1
python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*-c*.json"), key=lambda f: json.load(open(f))["max_concurrency"]):
    r = json.load(open(f))
    print(f"c={r['max_concurrency']:>4} ok={r['completed']} failed={r['failed']} out_tok/s={r['output_throughput']:.0f} "
          f"total_tok/s={r['total_token_throughput']:.0f} TTFT mean/med/p99={r['mean_ttft_ms']:.0f}/"
          f"{r['median_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} TPOT mean/med/p99={r['mean_tpot_ms']:.1f}/"
          f"{r['median_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f} ITL med={r['median_itl_ms']:.1f} E2E med={r['median_e2el_ms']:.0f}")
PY
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
if [ "${LATENCY:-1}" = 1 ]; then
  timeout 150 python3 -m llamaserve bench latency --model llama-4-scout $E --input-len 128 --output-len 128 \
      --batch-size 1 --num-iters 3 --output-json "$OUT/scout_latency_b1_$Q.json" 2>&1 | grep -E "median|Error|error" | head -4
fi
