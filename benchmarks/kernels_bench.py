"""Ceilings of this GPU and the Triton attention kernel against them. Run on the GPU machine:

    PYTHONPATH=src python3 benchmarks/kernels_bench.py        # writes $OUT/kernels_bench.json

- HBM: device-to-device copy of 2 GiB, bytes read + written per second.
- bf16 matmul: 8192^3 torch.matmul; FP8: torch._scaled_mm 8192^3 (per-tensor scales).
- decode attention: 64 requests x 4096 context, 32 query / 8 KV heads, head_dim 128, bf16 KV, block 16;
  bandwidth = KV bytes read / time (the issue's target: >= 70% of HBM).
- prefill attention: one 8192-token causal prompt, same heads; TFLOP/s counted as 2 * 2 * T^2 * D * Hq / 2.
- decode attention with an FP8 KV cache: 512 requests x 1536 context (the 1000/1000 workload's middle), and
  batch 1 x 4096 with and without split-KV;
- linear layers of Llama-3.1-8B at batch 1 and 16: FP8 torch._scaled_mm and bf16, weight bytes / time.
Times are CUDA-event medians over repeated runs after warm-up. SWEEP=1 adds a launch-parameter sweep.
"""

from __future__ import annotations

import json
import os

import torch

from llamaserve.kernels.paged_attention import paged_attention


def timed(fn, iters: int = 20) -> float:
    """Median seconds of fn() over iters runs, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000.0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(numel: int = 2**30) -> float:
    """TB/s of a device-to-device copy of `numel` bf16 values, counting bytes read and written."""
    x = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    return 2 * numel * 2 / t / 1e12


def ceilings() -> dict[str, float]:
    out = {"hbm_copy_TBps": copy_bandwidth()}
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = timed(lambda: a @ b)
    out["bf16_matmul_TFLOPs"] = 2 * 8192**3 / t / 1e12
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device="cuda")
    t = timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    out["fp8_scaled_mm_TFLOPs"] = 2 * 8192**3 / t / 1e12
    return out


def attention(num_reqs: int, ctx: int, qlen: int, hq: int = 32, hkv: int = 8, d: int = 128, bs: int = 16,
              launch: dict | None = None, fp8: bool = False, num_splits: int | None = None):
    blocks_per = ctx // bs
    cache = torch.randn(2, num_reqs * ctx, hkv, d, dtype=torch.bfloat16, device="cuda")
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    tables = torch.arange(num_reqs * blocks_per, device="cuda").view(num_reqs, blocks_per)
    tables = tables[:, torch.randperm(blocks_per, device="cuda")]  # scattered pages
    seq_lens = torch.full((num_reqs,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, (num_reqs + 1) * qlen, qlen, dtype=torch.int32, device="cuda")
    q = torch.randn(num_reqs * qlen, hq, d, dtype=torch.bfloat16, device="cuda")
    qlens = [qlen] * num_reqs
    from llamaserve.kernels.paged_attention import step_tiles

    block_m = (launch or {}).get("BLOCK_M")
    tiles = step_tiles({}, qlens, hq // hkv, q.device, block_m)
    return timed(lambda: paged_attention(q, cache, tables, seq_lens, qsl, qlens, bs, d**-0.5, tiles=tiles,
                                         launch=launch, num_splits=num_splits))


def graphed(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed `reps` times inside one CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return timed(g.replay) / reps


def linears(res: dict) -> None:
    """Weight-streaming rate of the 8B layer GEMMs at small batch, inside CUDA graphs: FP8 `_scaled_mm`, the
    Triton FP8 kernel (kernels/fp8_gemv.py, a few launch shapes) and bf16."""
    from llamaserve.kernels.fp8_gemv import fp8_gemv

    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    one = torch.ones((), device="cuda")
    total = sum(n * k for n, k in shapes.values())
    configs = {"bn16_bk512_w4_s4": (16, 512, 4, 4), "bn32_bk256_w4_s4": (32, 256, 4, 4),
               "bn16_bk256_w2_s6": (16, 256, 2, 6), "bn64_bk256_w4_s3": (64, 256, 4, 3)}
    for m in (1, 16):
        t8 = tb = 0.0
        tt = dict.fromkeys(configs, 0.0)
        for n, k in shapes.values():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w8, x8 = w.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn)
            t8 += graphed(lambda x8=x8, w8=w8: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                out_dtype=torch.bfloat16))
            tb += graphed(lambda x=x, w=w: x @ w.t())
            for name, (bn, bk, nw, ns) in configs.items():
                tt[name] += graphed(lambda x8=x8, w8=w8, bn=bn, bk=bk, nw=nw, ns=ns: fp8_gemv(
                    x8, one, w8, one, None, torch.bfloat16, bn, bk, nw, ns))
        res[f"linear_fp8_scaled_mm_m{m}_TBps"] = total / t8 / 1e12
        res[f"linear_bf16_m{m}_TBps"] = 2 * total / tb / 1e12
        for name, t in tt.items():
            res[f"linear_fp8_triton_{name}_m{m}_TBps"] = total / t / 1e12


def main() -> None:
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res.update(ceilings())
    t = attention(64, 4096, 1)
    kv_bytes = 64 * 4096 * 8 * 128 * 2 * 2
    res["decode_attn_64x4096_ms"] = t * 1e3
    res["decode_attn_TBps"] = kv_bytes / t / 1e12
    res["decode_attn_frac_of_hbm"] = res["decode_attn_TBps"] / res["hbm_copy_TBps"]
    t = attention(1, 8192, 8192)
    res["prefill_attn_8k_ms"] = t * 1e3
    res["prefill_attn_TFLOPs"] = 2 * 2 * 8192**2 * 128 * 32 / 2 / t / 1e12
    fp8_bytes = 512 * 1536 * 8 * 128 * 2
    t = attention(512, 1536, 1, fp8=True)
    res["decode_attn_fp8_512x1536_ms"] = t * 1e3
    res["decode_attn_fp8_512x1536_TBps"] = fp8_bytes / t / 1e12
    for splits in (1, None):
        for fp8 in (True, False):
            t = attention(1, 4096, 1, fp8=fp8, num_splits=splits)
            res[f"decode_attn_{'fp8' if fp8 else 'bf16'}_1x4096_{'auto' if splits is None else 'nosplit'}_us"] = t * 1e6
    linears(res)
    if os.environ.get("SWEEP"):  # launch-parameter sweep of both kernels
        flops = 2 * 2 * 8192**2 * 128 * 32 / 2
        for bm, bn, nw, ns in [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3),
                               (128, 128, 8, 3), (128, 64, 4, 4), (64, 32, 4, 3)]:
            key = f"bm{bm}_bn{bn}_w{nw}_s{ns}"
            try:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
                res[f"sweep_prefill_TFLOPs_{key}"] = flops / attention(1, 8192, 8192, launch=cfg) / 1e12
            except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                res[f"sweep_prefill_{key}"] = f"{type(e).__name__}"
        for bn, nw, ns in [(32, 4, 2), (64, 4, 2), (64, 2, 3), (16, 2, 3), (128, 4, 2), (32, 2, 2), (32, 2, 3),
                           (32, 1, 3)]:
            key = f"bn{bn}_w{nw}_s{ns}"
            try:
                cfg = {"BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
                res[f"sweep_decode_TBps_{key}"] = kv_bytes / attention(64, 4096, 1, launch=cfg) / 1e12
                res[f"sweep_decode_fp8_TBps_{key}"] = fp8_bytes / attention(512, 1536, 1, launch=cfg,
                                                                            fp8=True) / 1e12
            except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                res[f"sweep_decode_{key}"] = f"{type(e).__name__}"
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "kernels_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
