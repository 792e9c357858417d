#!/usr/bin/env bash
# Llama 4 Scout FP8 batch-1 decode on one H200: the decode-MoE / norm kernel tests, the batch-1 kernel benchmark
# (decode_bench.py: launch sweeps in CUDA graphs against cuBLAS and the copy ceiling), then Scout's decode step at
# BATCHES, timed and profiled (profile_step.py), and the batch-1 `bench latency` with this GPU's HBM copy and
# read-only stream rates (hbm_read_probe.py) and the step's ratio to both floors (17.20 GB per token). Results in $OUT.
#   bash benchmarks/gpu_scout_decode_run.sh [BATCHES]   # "1,16" by default; KERNELS=0 skips decode_bench,
#                                                       # TESTS=0 the GPU tests and the Llama 4 check,
#                                                       # PROFILE=0 the profile, LATENCY=0 bench latency,
#                                                       # STREAM_AB=1 adds bench latency with one stream,
#                                                       # VARIANTS="A=0 B=1,C=0" times each switch setting
#                                                       # (decode_variants.py, one model load)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moe_decode.py tests/kernels/test_fused_moe.py \
    tests/kernels/test_norm_act.py tests/kernels/test_paged_attention.py tests/kernels/test_rope_kv.py \
    tests/kernels/test_cuda_graphs.py tests/kernels/test_pdl.py tests/kernels/test_sampling.py \
    tests/kernels/test_gemv.py tests/layers/test_fp8.py \
    --deselect tests/layers/test_fp8.py::test_online_fp8_smollm2_agrees_with_float32 > "$OUT/gpu_tests.log" 2>&1
# (deselected: it needs the 98 MB SmolLM2 file, which does not travel to the device; CI runs it)
tail -3 "$OUT/gpu_tests.log"
# a small random Llama 4 in float32 with the Triton kernels (shared-expert stream included) against transformers
timeout 200 python3 benchmarks/gpu_llama4_check.py > "$OUT/llama4_check.log" 2>&1; tail -4 "$OUT/llama4_check.log"
fi
if [ "${KERNELS:-1}" = 1 ]; then
  timeout 300 python3 benchmarks/decode_bench.py > "$OUT/decode_bench.log" 2>&1
  cut -c1-700 "$OUT/decode_bench.log" | grep -v Warning
fi
if [ -n "${VARIANTS:-}" ]; then
  # shellcheck disable=SC2086
  MODEL=llama-4-scout timeout 420 python3 benchmarks/decode_variants.py $VARIANTS > "$OUT/variants.log" 2>&1
  grep -E "variant|Error|error" "$OUT/variants.log" | cut -c1-300
fi
if [ "${PROFILE:-1}" = 1 ]; then
  MODEL=llama-4-scout timeout 280 python3 benchmarks/profile_step.py "${1:-1,16}" auto fp8 > "$OUT/profile.log" 2>&1
  grep -E "Error|error|step_wall|busy_ms|idle_ms|kernels_per|\"(moe|gemm|attention|other|norm|copies|activation)\"" \
      "$OUT/profile.log" | head -40
fi
latency() {  # $1: a tag; the environment picks the variant
  timeout 200 python3 -m llamaserve bench latency --model llama-4-scout --load-format dummy --quantization fp8 \
      --kv-cache-dtype fp8 --max-seq-len 2304 --input-len 128 --output-len 128 --batch-size 1 --num-iters 3 \
      --output-json "$OUT/scout_latency_b1_fp8$1.json" > "$OUT/latency$1.log" 2>&1
  echo "bench latency$1:"; grep -E "median|Error|error" "$OUT/latency$1.log" | head -6
}
if [ "${LATENCY:-1}" = 1 ]; then
  latency ""
  timeout 120 python3 benchmarks/hbm_read_probe.py > "$OUT/hbm_read.log" 2>&1
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
step = json.load(open(f"{out}/scout_latency_b1_fp8.json"))["decode_step_ms"]["median"]
hbm = json.load(open(f"{out}/hbm_read.json"))
for name, tbps in (("copy", hbm["copy_TBps_read_plus_write"]), ("read", hbm["triton_read_TBps"]["best"][1])):
    floor = 17.20e9 / (tbps * 1e12) * 1e3  # Scout's batch-1 bytes per token (docs/performance.md)
    print(f"step {step:.3f} ms; {name} {tbps:.3f} TB/s -> floor {floor:.3f} ms, 1.3 x = {1.3 * floor:.3f}: "
          f"{step / floor:.3f} x the floor")
PY
fi
# A/B: the shared expert on the main stream
if [ "${STREAM_AB:-0}" = 1 ]; then LLAMASERVE_SHARED_EXPERT_STREAM=0 latency _one_stream; fi
