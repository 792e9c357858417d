"""Unsplit FP8 decode attention, kernel alone: launch (BLOCK_N x warps x stages) against query group size.
Run on the GPU machine: PYTHONPATH=src python3 benchmarks/attn_decode_sweep.py   # writes $OUT/attn_decode_sweep.json
Groups 4 / 5 / 8 are Llama-3.1-8B / Llama 4 Scout / Llama-3.3-70B (32 / 40 / 64 query heads over 8 KV heads);
FP8 KV bytes read / median CUDA-event time, random pages (benchmarks/kernels_bench.py's `attention`).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from kernels_bench import attention  # noqa: E402

LAUNCHES = [(32, 1, 3), (64, 2, 3), (64, 4, 2), (32, 2, 3), (64, 2, 2)]


def main() -> None:
    res: dict[str, float] = {}
    for reqs, ctx in ((64, 1536), (128, 1536), (256, 1024)):
        kv_bytes = reqs * ctx * 8 * 128 * 2
        for hq in (32, 40, 64):
            row = []
            for bn, nw, ns in LAUNCHES:
                cfg = {"BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
                tbps = kv_bytes / attention(reqs, ctx, 1, hq=hq, launch=cfg, fp8=True) / 1e12
                res[f"b{reqs}_ctx{ctx}_g{hq // 8}_{bn}x{nw}x{ns}_TBps"] = tbps
                row.append(f"{bn}x{nw}x{ns} {tbps:.2f}")
            print(f"batch {reqs} ctx {ctx} group {hq // 8}: " + ", ".join(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "attn_decode_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
