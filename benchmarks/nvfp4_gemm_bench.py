"""GPU timing of the weight-only NVFP4 kernels (kernels/nvfp4_gemm.py) against bf16 cuBLAS on the same shapes.

    PYTHONPATH=src python3 benchmarks/nvfp4_gemm_bench.py        # prints a table, writes $OUT/nvfp4_gemm.json

Linear: Llama-3.1-8B's projections (qkv, o, gate-up, down) at M = 1, 16, 256, 4096; "GB/s" is the bytes of the
packed weight and its scales streamed (the decode bound) per second. MoE: Llama 4 Scout's routed experts (16 x
5120 -> 2 x 8192 -> 5120, top-1) at 1, 64 and 2048 tokens, against the bf16 grouped kernel (kernels/fused_moe.py).
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing

from llamaserve.kernels.fused_moe import fused_moe
from llamaserve.kernels.nvfp4_gemm import nvfp4_fused_moe, nvfp4_gemm
from llamaserve.layers.nvfp4 import quantize_nvfp4


def _bench(fn, *args) -> float:
    try:
        return triton.testing.do_bench(lambda: fn(*args), warmup=20, rep=100)  # ms
    except Exception as e:  # noqa: BLE001 (a baseline that does not launch on this GPU: report, go on)
        print(f"  failed: {type(e).__name__}: {str(e)[:120]}")
        return float("nan")


def _show(row: dict) -> dict:
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def linear_rows() -> list[dict]:
    rows = []
    for name, n, k in [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]:
        w = torch.randn(n, k, device="cuda") * k**-0.5
        packed, scale, g = quantize_nvfp4(w)
        g = g.expand(n).contiguous()
        wb = w.bfloat16()
        weight_bytes = packed.numel() + scale.numel() + 4 * n
        for m in (1, 16, 256, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err = ((nvfp4_gemm(x, packed, scale, g).float() - x.float() @ (w.float()).t()).norm()
                   / (x.float() @ w.float().t()).norm()).item()
            t4 = _bench(nvfp4_gemm, x, packed, scale, g)
            t16 = _bench(torch.matmul, x, wb.t())
            rows.append(_show({"shape": f"{name} {m}x{n}x{k}", "nvfp4_ms": t4, "bf16_ms": t16,
                               "nvfp4_GBps": weight_bytes / t4 / 1e6, "nvfp4_TFLOPs": 2 * m * n * k / t4 / 1e9,
                               "rel_err_vs_float": err}))
    return rows


def moe_rows() -> list[dict]:
    e, h, inter = 16, 5120, 8192
    gu = torch.randn(e, 2 * inter, h, device="cuda") * h**-0.5
    dn = torch.randn(e, h, inter, device="cuda") * inter**-0.5
    qgu, qdn = quantize_nvfp4(gu), quantize_nvfp4(dn)
    gu_rows, dn_rows = qgu[2].expand(e, 2 * inter).contiguous(), qdn[2].expand(e, h).contiguous()
    gu_bf, dn_bf = gu.transpose(1, 2).bfloat16().contiguous(), dn.transpose(1, 2).bfloat16().contiguous()
    del gu, dn
    rows = []
    for t in (1, 64, 2048):
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        top_val, top_ids = torch.randn(t, e, device="cuda").topk(1, dim=-1)
        scores = torch.sigmoid(top_val)
        t4 = _bench(nvfp4_fused_moe, x, qgu[0], qgu[1], gu_rows, qdn[0], qdn[1], dn_rows, top_ids, scores)
        t16 = _bench(fused_moe, x, gu_bf, dn_bf, top_ids, scores)
        rows.append(_show({"shape": f"scout experts T={t}", "nvfp4_ms": t4, "bf16_ms": t16}))
    return rows


def main() -> None:
    print(torch.cuda.get_device_name())
    rows = linear_rows() + moe_rows()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "nvfp4_gemm.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
