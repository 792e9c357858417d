"""Does an L2 prefetch issued by a latency-bound kernel speed up the weight stream that follows it?

    PYTHONPATH=src python3 benchmarks/l2_prefetch_probe.py     # H100/H200; writes $OUT/l2_prefetch_probe.json

48 "layers", each a short busy kernel (standing in for attention or a norm: a few programs spinning a fixed
number of iterations) followed by a batch-1 FP8 GEMM (torch._scaled_mm, as the engine's decode runs qkv and o) on
that layer's own weight, so every weight comes from HBM. All 48 run in one CUDA graph; the time per layer is the
median of 20 replays. The busy kernel can also issue `cp.async.bulk.prefetch.L2` for the GEMM's weight
(kernels/prefetch.py): if the prefetch lands while it spins, the GEMM reads L2 instead of HBM.
"""

from __future__ import annotations

import json
import os
import statistics

import torch
import triton
import triton.language as tl

from llamaserve.kernels import moe_decode as md
from llamaserve.kernels.prefetch import gdc_launch_dependents, prefetch_l2


@triton.jit
def _busy_kernel(W, nbytes, X, iters, PREFETCH: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 TRIGGER: tl.constexpr = False):
    if TRIGGER:
        gdc_launch_dependents()
    if PREFETCH:
        prefetch_l2(W, nbytes, tl.program_id(0), tl.num_programs(0), CHUNK, BLOCK)
    acc = tl.load(X + tl.arange(0, 32))
    for _ in range(iters):
        acc = acc * 1.0001 + 0.5
    tl.store(X + 32 * (tl.program_id(0) + 1) + tl.arange(0, 32), acc)


def run(n: int, k: int, iters: int, prefetch: bool, programs: int, chunk: int, busy: bool = True,
        repeat: int = 1) -> float:
    dev = "cuda"
    layers = 48
    ws = [torch.randn(n, k, device=dev).to(torch.float8_e4m3fn) for _ in range(layers)]
    x = torch.randn(1, k, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    scratch = torch.zeros(32 * (programs + 1), device=dev)
    block = max(32, triton.next_power_of_2(triton.cdiv(triton.cdiv(n * k, chunk), programs)))

    def body() -> None:
        for w in ws:
            if busy:
                _busy_kernel[(programs,)](w, w.numel(), scratch, iters, PREFETCH=prefetch, CHUNK=chunk, BLOCK=block,
                                          num_warps=1)
            for _ in range(repeat):  # repeat > 1: the later GEMMs read the weight from L2
                torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / layers)
    ws.clear()
    del g
    torch.cuda.empty_cache()
    return statistics.median(times)


def run_decode_gemm(n: int, k: int, iters: int, pdl: bool, cfg: dict) -> float:
    """busy kernel (triggering its dependents at once) -> the Triton decode GEMM, with or without PDL."""
    dev = "cuda"
    layers = 48
    ws = [torch.randn(n, k, device=dev).to(torch.float8_e4m3fn) for _ in range(layers)]
    x = torch.randn(1, k, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    scratch = torch.zeros(32 * 133, device=dev)

    def body() -> None:
        for w in ws:
            if iters:
                _busy_kernel[(132,)](w, w.numel(), scratch, iters, PREFETCH=False, CHUNK=65536, BLOCK=32,
                                     TRIGGER=True, num_warps=1)
            md._gemm(x, w.t().unsqueeze(0), out, None, n, False, one, one, out, config=cfg, pdl=pdl)

    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / layers)
    ws.clear()
    del g
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    if os.environ.get("PDL_ONLY") == "1":
        return pdl_main()
    out = os.environ.get("OUT", ".")
    res: dict[str, float] = {}
    for name, (n, k) in {"o": (5120, 5120), "qkv": (7168, 5120)}.items():
        res[f"{name}_gemm_alone"] = run(n, k, 0, False, 1, 65536, busy=False)
        res[f"{name}_gemm_twice"] = run(n, k, 0, False, 1, 65536, busy=False, repeat=2)
        res[f"{name}_busy3000_prefetch_gemm_twice"] = run(n, k, 3000, True, 132, 65536, repeat=2)
        for iters in (1000, 3000):
            res[f"{name}_busy{iters}_alone"] = run(16, 16, iters, False, 132, 65536)  # tiny GEMM
            res[f"{name}_busy{iters}_gemm"] = run(n, k, iters, False, 132, 65536)
            for programs in (16, 132):
                for chunk in (16384, 65536):
                    res[f"{name}_busy{iters}_gemm_prefetch_p{programs}_c{chunk}"] = run(n, k, iters, True, programs,
                                                                                      chunk)
        print(json.dumps({k: round(v, 2) for k, v in res.items() if k.startswith(name)}, indent=1), flush=True)
    res["device"] = torch.cuda.get_device_name()  # type: ignore[assignment]
    with open(os.path.join(out, "l2_prefetch_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


def pdl_main() -> None:
    """busy -> Triton decode GEMM with and without programmatic dependent launch + L2 prefetch, against busy ->
    cuBLAS, over launch configurations."""
    out = os.environ.get("OUT", ".")
    res: dict[str, float] = {}
    w = torch.randn(7168, 5120, device="cuda").to(torch.float8_e4m3fn)
    x = torch.randn(1, 5120, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    ys = [torch.empty(1, 7168, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for y, pdl in zip(ys, (False, True)):
        md._gemm(x, w.t().unsqueeze(0), y, None, 7168, False, one, one, y, pdl=pdl)
    want = (x.float() @ w.float().t()).to(torch.bfloat16)
    res["pdl_equal_no_pdl"] = bool(torch.equal(ys[0], ys[1]))  # type: ignore[assignment]
    res["max_err_vs_torch"] = float((ys[1].float() - want.float()).abs().max())
    print(res, flush=True)
    for name, (n, k) in {"o": (5120, 5120), "qkv": (7168, 5120)}.items():
        res[f"{name}_busy1000_cublas"] = run(n, k, 1000, False, 132, 65536)
        res[f"{name}_busy1000_alone"] = run(16, 16, 1000, False, 132, 65536)
        for bn, bk, nw, st in [(16, 512, 4, 4), (32, 512, 4, 4), (32, 256, 4, 6), (64, 512, 4, 4), (16, 256, 2, 6)]:
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": st}
            tag = f"bn{bn}_bk{bk}_w{nw}_s{st}"
            res[f"{name}_gemm_alone_{tag}"] = run_decode_gemm(n, k, 0, False, cfg)
            res[f"{name}_busy1000_gemm_{tag}"] = run_decode_gemm(n, k, 1000, False, cfg)
            res[f"{name}_busy1000_gemm_pdl_{tag}"] = run_decode_gemm(n, k, 1000, True, cfg)
        print(json.dumps({k: round(v, 2) for k, v in res.items() if k.startswith(name)}, indent=1), flush=True)
    res["device"] = torch.cuda.get_device_name()  # type: ignore[assignment]
    with open(os.path.join(out, "l2_prefetch_pdl.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
