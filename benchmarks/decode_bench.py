"""Batch-1 decode kernels of Llama-4-Scout (FP8) on the GPU, each timed inside a CUDA graph (16 launches per graph,
weights rotated so none is re-read from L2), against cuBLAS and the HBM copy ceiling.

    PYTHONPATH=src python3 benchmarks/decode_bench.py      # writes $OUT/decode_bench.json
    QUICK=1 ...                                            # smaller launch sweep

- decode MoE GEMMs (kernels/moe_decode.py) at one token: a launch sweep of the gate-up (SiLU fused) and the down
  projection of one expert (16 experts rotated), the down weights also with rows padded past 8,192 bytes;
  cuBLAS FP8 on one expert's matrices as the reference; the whole decode MoE step at 1..16 tokens against the
  grouped path (kernels/fused_moe.py).
- Scout's dense FP8 layers at one token (qkv, o, shared gate-up / down): cuBLAS `_scaled_mm` against the decode
  kernel as a one-expert MoE GEMM.
- attention at batch 1 (40 query / 8 KV heads, FP8 KV, 256 and 2,048 tokens of context) by split-KV count;
  RMSNorm of one 5,120-wide row by warp count; the router (5,120 -> 16) by cuBLAS and by the router kernel.
- attention launch sweep at batch 1: split count, merge in the last program or the combine kernel, key tile,
  warps. DENSE_SWEEP=1 sweeps the decode GEMM's launch space on the dense layers.
PARTS=small,moe,dense picks groups (default all).
"""

from __future__ import annotations

import itertools
import json
import os
from functools import partial

import torch
import triton
from moe_bench import copy_bw, per_launch  # benchmarks/ (this script's folder) is on sys.path

from llamaserve.kernels import fused_moe as fm
from llamaserve.kernels import moe_decode as md

E, H, INTER, REPS = 16, 5120, 8192, 16
FP8 = torch.float8_e4m3fn


def graph_us(fns: list) -> float:
    """Microseconds per call of the calls `fns`, captured in one CUDA graph and replayed."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return round(per_launch(g.replay, iters=10) / len(fns) * 1e6, 2)


def nk(e: int, n: int, k: int, pad: int = 0) -> torch.Tensor:
    """Random FP8 expert weights of logical shape [e, k, n], stored [e, n, k + pad] (K contiguous)."""
    w = ((torch.rand(e, n, k + pad, device="cuda") - 0.5) * 0.1).to(FP8)
    return w[:, :, :k].transpose(1, 2)


def moe_gemms(res: dict, hbm: float, quick: bool) -> None:
    one = torch.ones(E, device="cuda")
    s = torch.ones((), device="cuda")
    ref = torch.empty(1, dtype=torch.bfloat16, device="cuda")
    ids = [torch.full((1,), e, dtype=torch.int64, device="cuda") for e in range(REPS)]
    gu, dn, dn_pad = nk(E, 2 * INTER, H), nk(E, H, INTER), nk(E, H, INTER, 256)
    x = torch.randn(1, H, device="cuda").to(FP8)
    act = torch.randn(1, INTER, device="cuda").to(FP8)
    bns, bks = (16, 32, 64), (128, 256, 512)
    warps, stages = ((4,), (3, 4)) if quick else ((2, 4, 8), (3, 4, 6))
    out_gu = torch.empty(1, INTER, dtype=FP8, device="cuda")
    out_dn = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
    cases = {"gate_up": (x, gu, INTER, True, out_gu), "down": (act, dn, H, False, out_dn),
             "down_pad256": (act, dn_pad, H, False, out_dn)}
    for name, (a, w, n, glu, out) in cases.items():
        floor = w.shape[1] * w.shape[2] / hbm / 1e6
        rows = []
        for bn, bk, nw, ns in itertools.product(bns, bks, warps, stages):
            if ns * bk * (16 + (2 if glu else 1) * bn) > md.SMEM_BYTES:
                continue
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
            try:
                us = graph_us([partial(md._gemm, a, w, out, i, n, glu, s, one, ref,
                                       out_scale=s if glu else None, config=cfg) for i in ids])
            except Exception as exc:  # out of resources
                rows.append({**cfg, "error": type(exc).__name__})
                continue
            rows.append({**cfg, "us": us, "TBps": round(w.shape[1] * w.shape[2] / us / 1e6, 3)})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        default = md.decode_config(n, a.shape[1], glu, 1, 1)
        same = [r for r in ok if all(r[c] == default[c] for c in default)]
        res.setdefault("moe_gemm_m1", {})[name] = {"floor_us": round(floor, 1), "default": same[:1],
                                                   "best": ok[:8]}
        print(name, "floor", round(floor, 1), "default", same[:1], "best", ok[:3], flush=True)
    # cuBLAS on one expert's matrices (rotated over the experts)
    for name, w, a in (("gate_up", gu, x), ("down", dn, act)):
        fns = [partial(torch._scaled_mm, a, w[e], scale_a=s, scale_b=s, out_dtype=torch.bfloat16) for e in range(E)]
        us = graph_us(fns)
        res.setdefault("cublas_one_expert_m1", {})[name] = {"us": us,
                                                           "TBps": round(w.shape[1] * w.shape[2] / us / 1e6, 3)}
    print("cublas one expert", res["cublas_one_expert_m1"], flush=True)
    for m in (1, 2, 4, 8, 16):
        xb = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(m, E, device="cuda", dtype=torch.bfloat16)
        shared = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        hit = int(logits.argmax(-1).unique().numel())
        step = partial(fm.fused_moe, xb, gu, dn, None, None, one, one, s, s, shared=shared, router_logits=logits)
        row = {"experts_hit": hit, "floor_us": round(hit * 3 * H * INTER / hbm / 1e6, 1),
               "decode": graph_us([step] * 4)}
        saved, md.DECODE_MAX_PAIRS = md.DECODE_MAX_PAIRS, 0
        try:
            row["grouped"] = graph_us([step] * 4)
        finally:
            md.DECODE_MAX_PAIRS = saved
        res.setdefault("moe_step_us", {})[m] = row
        print("moe step", m, row, flush=True)


def dense(res: dict) -> None:
    """Scout's FP8 linears at one token: cuBLAS against the decode kernel (one expert); 8 weight copies rotated."""
    s = torch.ones((), device="cuda")
    one = torch.ones(1, device="cuda")
    ref = torch.empty(1, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(1, dtype=torch.int64, device="cuda")
    for name, (n, k) in {"qkv": (7168, H), "o": (H, H), "shared_gate_up": (2 * INTER, H),
                         "shared_down": (H, INTER)}.items():
        ws = [nk(1, n, k) for _ in range(8)]
        x = torch.randn(1, k, device="cuda").to(FP8)
        row = {"cublas": graph_us([partial(torch._scaled_mm, x, w[0], scale_a=s, scale_b=s,
                                           out_dtype=torch.bfloat16) for w in ws])}
        glu = name == "shared_gate_up"
        nn_ = n // 2 if glu else n
        out = torch.empty(1, nn_, dtype=FP8 if glu else torch.bfloat16, device="cuda")
        configs = [{"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
                   {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4},
                   {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 6}]
        if os.environ.get("DENSE_SWEEP") == "1" and not glu:  # the decode GEMM's launch space, within SMEM
            configs = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": st}
                       for bn, bk, nw, st in itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (3, 4, 6))
                       if st * bk * (16 + bn) <= md.SMEM_BYTES]
        for cfg in configs:
            key = "triton_bn{BLOCK_N}_bk{BLOCK_K}_w{num_warps}_s{num_stages}".format(**cfg)
            row[key] = graph_us([partial(md._gemm, x, w, out, ids, nn_, glu, s, one, ref,
                                         out_scale=s if glu else None, config=cfg) for w in ws])
        best = min((k_ for k_ in row if k_.startswith("triton")), key=row.get)
        row["best_triton"] = [best, row[best], round(n * k / row[best] / 1e6, 3)]
        row["TBps_cublas"] = round(n * k / row["cublas"] / 1e6, 3)
        res.setdefault("dense_m1_us", {})[name] = row
        print("dense", name, {k_: v for k_, v in row.items() if not k_.startswith("triton_")}, flush=True)


def small(res: dict) -> None:
    from llamaserve.kernels.norm_act import _rms_norm_kernel
    from llamaserve.kernels.paged_attention import paged_attention, step_tiles

    for ctx in (256, 2048):
        hq, hkv, d, bs = 40, 8, 128, 16
        nblk = ctx // bs
        cache = torch.randn(2, ctx, hkv, d, device="cuda").to(FP8)
        tables = torch.randperm(nblk, device="cuda").view(1, nblk)
        seq_lens = torch.full((1,), ctx, dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        q = torch.randn(1, hq, d, dtype=torch.bfloat16, device="cuda")
        tiles = step_tiles({}, [1], hq // hkv, q.device)
        row = {}
        for splits in (1, 2, 4, 8, 16):
            row[splits] = graph_us([partial(paged_attention, q, cache, tables, seq_lens, qsl, [1], bs, d**-0.5,
                                            tiles=tiles, num_splits=splits)] * 8)
        res.setdefault("attention_b1_us_by_splits", {})[ctx] = row
        print("attention ctx", ctx, row, flush=True)
        sweep = []  # launch sweep: splits x merge (fused in the last program / combine kernel) x tile x warps
        for splits in (1, 4, 8, 16):
            for fused in ((True, False) if splits > 1 else (False,)):
                os.environ["LLAMASERVE_ATTN_FUSED_COMBINE"] = "1" if fused else "0"
                for bn, nw in itertools.product((32, 64, 128), (1, 2, 4, 8)):
                    us = graph_us([partial(paged_attention, q, cache, tables, seq_lens, qsl, [1], bs, d**-0.5,
                                           tiles=tiles, num_splits=splits,
                                           launch={"BLOCK_N": bn, "num_warps": nw})] * 8)
                    sweep.append({"splits": splits, "fused": fused, "BLOCK_N": bn, "num_warps": nw, "us": us})
        os.environ.pop("LLAMASERVE_ATTN_FUSED_COMBINE")
        sweep.sort(key=lambda r: r["us"])
        res.setdefault("attention_b1_sweep", {})[ctx] = sweep
        print("attention sweep ctx", ctx, sweep[:6], flush=True)
    x = torch.randn(1, H, dtype=torch.bfloat16, device="cuda")
    r = torch.randn(1, H, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(H, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(1, H, dtype=FP8, device="cuda")
    s = torch.ones((), device="cuda")
    row = {}
    for nw in (4, 8, 16):
        row[nw] = graph_us([partial(_rms_norm_kernel[(1,)], x, x, r, w, y, s, y, s, H, H, H, H, H, H, 1e-5,
                                    HAS_X2=False, HAS_RESIDUAL=True, HAS_SCALE=True, HAS_COPY=False,
                                    BLOCK=triton.next_power_of_2(H), num_warps=nw)] * 8)
    res["rms_norm_1x5120_us_by_warps"] = row
    wr = torch.randn(E, H, dtype=torch.bfloat16, device="cuda")
    res["router_us"] = {"cublas": graph_us([partial(torch.matmul, x, wr.t())] * 8),
                        "kernel": graph_us([partial(md.router_logits, x, wr)] * 8)}
    print("rms_norm", row, "router", res["router_us"], flush=True)


def main() -> None:
    """PARTS: which groups to run, comma-separated from small, moe, dense (default: all)."""
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(0), "hbm_copy_TBps": copy_bw()}
    quick = os.environ.get("QUICK") == "1"
    parts = os.environ.get("PARTS", "small,moe,dense").split(",")
    if "small" in parts:
        small(res)
    if "moe" in parts:
        moe_gemms(res, res["hbm_copy_TBps"], quick)
    if "dense" in parts:
        dense(res)
    with open(os.path.join(os.environ.get("OUT", "."), "decode_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
