"""HBM bandwidth on this GPU three ways: a device-to-device copy (read + write, the ceiling docs/performance.md
has used), a read-only Triton stream (what a one-token decode step does to its weights), and the two reads of
a Scout decode step's largest read: its bf16 lm_head (202,048 x 5,120) at one row, by cuBLAS (F.linear) and
by kernels/gemv.py (launch swept), and torch's sum.

    PYTHONPATH=src python3 benchmarks/hbm_read_probe.py   # writes $OUT/hbm_read.json

Each is timed over 20 launches between CUDA events after 3 warm-up launches, on 2 GiB (copy, Triton read, sum)
or the 2.07 GB lm_head, far past the 50 MB L2. The Triton read kernel's launch is swept (elements per step,
steps per program, warps) and the best kept.
"""

from __future__ import annotations

import itertools
import json
import os
from functools import partial

import torch
import triton
import triton.language as tl
from moe_bench import per_launch  # benchmarks/ (this script's folder) is on sys.path

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays False
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr, STEPS: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # as a programmatic dependent (benchmarks/boundary_probe.py): let the next start, wait for the last
        gdc_launch_dependents()
        gdc_wait()
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(STEPS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Out + tl.program_id(0), tl.sum(acc, 0))


def main() -> None:
    res: dict = {"device": torch.cuda.get_device_name(0)}
    n = 2**29  # float32 elements: 2 GiB
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    res["copy_TBps_read_plus_write"] = round(2 * x.nbytes / per_launch(partial(y.copy_, x)) / 1e12, 3)
    sweep = {}
    for block, steps, warps in itertools.product((1024, 2048, 4096), (4, 16, 64), (4, 8)):
        grid = (triton.cdiv(n, block * steps),)
        out = torch.empty(grid[0], device="cuda")
        t = per_launch(partial(_read_kernel[grid], x, out, n, BLOCK=block, STEPS=steps, num_warps=warps))
        sweep[f"{block}x{steps}x{warps}"] = round(x.nbytes / t / 1e12, 3)
        if block == 1024 and steps == 4 and warps == 4:  # the kernel reads what it should
            torch.testing.assert_close(out.sum(), x.sum(), rtol=1e-3, atol=1.0)
    best = max(sweep, key=sweep.get)
    res["triton_read_TBps"] = {"best": [best, sweep[best]], "sweep": sweep}
    res["torch_sum_TBps"] = round(x.nbytes / per_launch(x.sum) / 1e12, 3)
    w = torch.randn(202048, 5120, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(1, 5120, dtype=torch.bfloat16, device="cuda")
    t = per_launch(partial(torch.nn.functional.linear, h, w))
    res["lm_head_gemv_us"] = round(t * 1e6, 1)
    res["lm_head_gemv_TBps"] = round(w.nbytes / t / 1e12, 3)
    from llamaserve.kernels.gemv import gemv

    lm = {}
    for bn, bk, nw in itertools.product((8, 16, 32, 64), (256, 512, 1024), (4, 8)):
        if bn * bk > 32768:  # more than 64 KB of weights per step and program: spills
            continue
        lm[f"{bn}x{bk}x{nw}"] = round(per_launch(partial(gemv, h, w, bn, bk, nw)) * 1e6, 1)
    best = min(lm, key=lm.get)
    bn, bk, nw = (int(v) for v in best.split("x"))
    torch.testing.assert_close(gemv(h, w, bn, bk, nw).float(), torch.nn.functional.linear(h, w).float(),
                               rtol=2e-2, atol=2e-2)
    res["lm_head_triton_gemv_us"] = {"best": [best, lm[best], round(w.nbytes / lm[best] / 1e6, 3)], "sweep": lm}
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "hbm_read.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
