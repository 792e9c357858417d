#!/usr/bin/env bash
# Scout FP8 at batch 128 on one H200: the decode step under the grouped MoE's launch overrides
# (LLAMASERVE_FUSED_MOE_GATE_UP / _DOWN, decode_variants.py with BATCH=128, one model load), then, only if one
# variant is at least 1.5% faster than the default, `bench serve` at concurrency 128 with it and with the default.
# Needs the server's wheels in .whl (carried). Results in $OUT.
#   bash benchmarks/gpu_moe_batch_ab.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src PYTHONUNBUFFERED=1; O=$OUT
BATCH=128 MODEL=llama-4-scout timeout 200 python3 benchmarks/decode_variants.py default LLAMASERVE_FUSED_MOE_DOWN=128x256x4x4x1 LLAMASERVE_FUSED_MOE_DOWN=64x256x4x4x1 LLAMASERVE_FUSED_MOE_GATE_UP=128x256x4x4x1 LLAMASERVE_FUSED_MOE_GATE_UP=64x128x4x6x1 LLAMASERVE_FUSED_MOE_GATE_UP=64x256x8x4x1 LLAMASERVE_FUSED_MOE_DOWN=128x128x4x6x2 default 2>&1 | grep -E '"variant"|Error' | cut -c1-130
best=$(python3 -c "
import json;r=json.load(open('$O/decode_variants.json'))['results'];d=min(x['step_ms_median'] for x in r if x['variant']=='default');b=min(r,key=lambda x:x['step_ms_median'])
print(b['variant'] if b['variant']!='default' and b['step_ms_median']<0.985*d else '')")
echo "best: ${best:-default}"
[ -n "$best" ] || exit 0
export PYTHONPATH=/tmp/site
for v in "$best" default; do
  echo "== serve $v"; ( [ "$v" != default ] && export ${v//,/ }; OUT=$O/serve_${v//[=,]/_} LATENCY=0 SERVE_TIMEOUT=170 bash benchmarks/gpu_scout_serve_run.sh fp8 128 2 --max-batch-size 256 2>&1 | grep -E "c=|Error" )
done
