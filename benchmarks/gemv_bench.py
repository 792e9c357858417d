"""Scout's one-token FP8 linears (qkv, o, shared down, and one expert's gate-up) by cuBLAS `_scaled_mm`, by the
tensor-core decode GEMM the MoE uses (kernels/moe_decode.py `_gemm` at its default launch; SiLU-and-mul fused
for the gate-up, as the engine runs it) and by kernels/gemv.py (plain loads; launch swept, float32 and float16
products), beside hbm_read_probe.py's plain read kernel over the same bytes (`plain_read_*`: the best a kernel of
that size streams).

    PYTHONPATH=src python3 benchmarks/gemv_bench.py   # writes $OUT/gemv_bench.json

Each timing is one CUDA graph of 8 launches over 8 copies of the weight (so none is read from the 50 MB L2),
replayed between CUDA events (decode_bench.py's `graph_us`); microseconds per launch. The best launch's output
is checked against cuBLAS. SWEEP="BLOCK_Ns;BLOCK_Ks;warps" sets the launch grid (e.g. "4,8,16;1024,2048;4,8").
"""

from __future__ import annotations

import itertools
import json
import os
from functools import partial

import torch
import triton
from decode_bench import graph_us  # benchmarks/ (this script's folder) is on sys.path
from hbm_read_probe import _read_kernel

from llamaserve.kernels import moe_decode as md
from llamaserve.kernels.gemv import gemv

FP8 = torch.float8_e4m3fn
SWEEP = [tuple(int(v) for v in part.split(","))  # SWEEP="BLOCK_Ns;BLOCK_Ks;warps"
         for part in os.environ.get("SWEEP", "16,32,64,128;256,512,1024;4,8").split(";")]
SHAPES = {"qkv": (7168, 5120), "o": (5120, 5120), "shared_down": (5120, 8192), "expert_gate_up": (16384, 5120)}


def main() -> None:
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(0)}
    sx, sw = torch.tensor(0.02, device="cuda"), torch.tensor(0.003, device="cuda")
    out_ref = torch.empty(1, dtype=torch.bfloat16, device="cuda")  # the decode GEMM's output dtype
    for name, (n, k) in SHAPES.items():
        ws = [((torch.rand(n, k, device="cuda") - 0.5) * 0.2).to(FP8) for _ in range(8)]
        x = torch.randn(1, k, device="cuda").to(FP8)
        row = {"cublas": graph_us([partial(torch._scaled_mm, x, w.t(), scale_a=sx, scale_b=sw,
                                           out_dtype=torch.bfloat16) for w in ws])}
        # the same bytes by hbm_read_probe's plain read kernel (no arithmetic beyond a sum): what a kernel of
        # this size can stream at best; 1,024 or 2,048 float32 x 4 steps per program, 8 warps
        for block in (1024, 2048):
            flat = [w.view(torch.float32).reshape(-1) for w in ws]
            part = torch.empty(triton.cdiv(flat[0].numel(), block * 4), device="cuda")
            row[f"plain_read_{block}x4x8"] = graph_us([partial(_read_kernel[(part.numel(),)], f, part, f.numel(),
                                                               BLOCK=block, STEPS=4, num_warps=8) for f in flat])
        glu = name.endswith("gate_up")  # the decode GEMM as the engine runs it: SiLU-and-mul, FP8 out
        out = torch.empty(1, n // 2 if glu else n, dtype=FP8 if glu else torch.bfloat16, device="cuda")
        row["decode_gemm"] = graph_us([partial(md._gemm, x, w.t().unsqueeze(0), out, None, out.shape[1], glu, sx,
                                               sw, out_ref, out_scale=sx if glu else None) for w in ws])
        forms = {"": {}, "_half": {"half": True}}  # float32 products, float16 products (the default since 2026-12-01)
        for (bn, bk, nw), (tag, form) in itertools.product(itertools.product(*SWEEP), forms.items()):
            if bn * bk > 65536 or (form and bn * bk // (32 * nw) > 128):  # a 2-D tile's registers per thread
                continue
            row[f"{bn}x{bk}x{nw}{tag}"] = graph_us([partial(gemv, x, w, bn, bk, nw, sx, sw, torch.bfloat16, **form)
                                                    for w in ws])
        best = min((key for key in row if key not in ("cublas", "decode_gemm") and not key.startswith("plain")),
                   key=row.get)
        launch, _, tag = best.partition("_")
        bn, bk, nw = (int(v) for v in launch.split("x"))
        got = gemv(x, ws[0], bn, bk, nw, sx, sw, torch.bfloat16, **forms["_" + tag if tag else ""]).float()
        want = torch._scaled_mm(x, ws[0].t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16).float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
        row["best"] = [best, row[best], round(n * k / row[best] / 1e6, 3), "cublas TB/s",
                       round(n * k / row["cublas"] / 1e6, 3)]
        res[name] = row
        print(name, "cublas", row["cublas"], "decode_gemm", row["decode_gemm"], "best", row["best"],
              {k: v for k, v in row.items() if k.startswith("plain")}, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "gemv_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
