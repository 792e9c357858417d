"""Fused-MoE kernel on Llama-4-Scout shapes (16 experts, hidden 5120, expert intermediate 8192, top-1, FP8 W8A8):
launch-parameter sweep of the grouped GEMM and the whole MoE step against the weight-streaming floor.

    PYTHONPATH=src python3 benchmarks/moe_bench.py            # writes $OUT/moe_bench.json
    QUICK=1 ...                                                # fewer configurations
    SWEEP=0 ...                        # no launch sweep: only the whole MoE step per M against its floor
    SPLIT_SWEEP=1 ...                  # also sweep split-K x tiles for the decode GEMMs (M = 1), [E, N, K] layout

For each number of tokens M, every expert that gets a token streams its weights once, so the floor of a GEMM is
(experts hit x per-expert weight bytes) / HBM bandwidth. Both weight layouts are swept: the checkpoints'
[E, K, N] (N contiguous) and [E, N, K] (K contiguous, what FP8 tensor-core instructions read natively).
Times: CUDA events around 20 back-to-back launches after warm-up.
"""

from __future__ import annotations

import itertools
import json
import os
from functools import partial

import torch
import triton

from llamaserve.kernels import fused_moe as fm

E, H, INTER = 16, 5120, 8192


def per_launch(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def copy_bw() -> float:
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / per_launch(lambda: y.copy_(x)) / 1e12


def main() -> None:
    quick = os.environ.get("QUICK") == "1"
    torch.manual_seed(0)
    dev = "cuda"
    res: dict = {"device": torch.cuda.get_device_name(0), "hbm_copy_TBps": copy_bw(), "sweep": {}, "best": {}}
    gu = (torch.rand(E, H, 2 * INTER, device=dev) - 0.5).to(torch.float8_e4m3fn)
    dn = (torch.rand(E, INTER, H, device=dev) - 0.5).to(torch.float8_e4m3fn)
    layouts = {"KN": (gu, dn), "NK": (gu.transpose(1, 2).contiguous().transpose(1, 2),
                                      dn.transpose(1, 2).contiguous().transpose(1, 2))}
    one = torch.ones(E, device=dev)
    s = torch.ones((), device=dev)
    bms = [16, 32, 64]
    bns = [32, 64, 128]
    bks = [64, 128, 256]
    launch = [(4, 4), (8, 4)] if not quick else [(4, 4)]
    sweep = os.environ.get("SWEEP", "1") == "1"
    for m in [1, 8, 32, 64, 128, 256, 512]:
        ids = torch.randint(0, E, (m, 1), device=dev)
        hit = int(ids.unique().numel())
        layouts_swept = layouts if sweep else {}
        x = torch.randn(m, H, device=dev).to(torch.float8_e4m3fn)
        act = torch.randn(m, INTER, device=dev).to(torch.float8_e4m3fn)
        inter = torch.empty(m, 2 * INTER, dtype=torch.bfloat16, device=dev)
        out = torch.empty(m, H, dtype=torch.bfloat16, device=dev)
        scores = torch.ones(m, device=dev)
        for lay, (w1, w2) in layouts_swept.items():
            for gemm, (a, w, o) in {"gate_up": (x, w1, inter), "down": (act, w2, out)}.items():
                floor_bytes = hit * w.shape[1] * w.shape[2]
                rows = []
                for bm, bn, bk, (nw, ns) in itertools.product(bms, bns, bks, launch):
                    if bm > max(16, triton.next_power_of_2(m)):
                        continue
                    sp, be = fm.align_by_expert(ids, E, bm)
                    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                    try:
                        t = per_launch(partial(fm._gemm, a, w, o, sp, be, scores, 1, False, False, s, one, bm,
                                               config=cfg))
                    except Exception as exc:  # out of shared memory etc.
                        rows.append({**cfg, "error": type(exc).__name__})
                        continue
                    rows.append({**cfg, "us": round(t * 1e6, 2), "TBps": round(floor_bytes / t / 1e12, 3)})
                ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
                res["sweep"][f"{gemm}_{lay}_m{m}"] = ok[:8]
                res["best"][f"{gemm}_{lay}_m{m}"] = ok[0] if ok else None
                print(gemm, lay, m, "experts hit", hit, "best", ok[0] if ok else None, flush=True)
        # the whole MoE step as the model runs it (default launch parameters, the model's [E, N, K] layout)
        topv = torch.randn(m, 1, device=dev)
        xb = torch.randn(m, H, device=dev, dtype=torch.bfloat16)
        gu_nk, dn_nk = layouts["NK"]
        t = per_launch(partial(fm.fused_moe, xb, gu_nk, dn_nk, ids, torch.sigmoid(topv).bfloat16(), one, one, s, s))
        res.setdefault("fused_moe_eager_us", {})[m] = round(t * 1e6, 1)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fm.fused_moe(xb, gu_nk, dn_nk, ids, torch.sigmoid(topv).bfloat16(), one, one, s, s)
        t = per_launch(g.replay)
        floor = hit * 3 * H * INTER / (res["hbm_copy_TBps"] * 1e12)
        res.setdefault("fused_moe_graph_us", {})[m] = {"us": round(t * 1e6, 1), "floor_us": round(floor * 1e6, 1)}
        print("fused_moe", m, res["fused_moe_graph_us"][m], flush=True)
    if os.environ.get("SPLIT_SWEEP") == "1":
        res["split_sweep_m1"] = split_sweep(*layouts["NK"], one, s)
    # cuBLAS reference: one expert's gate-up as a dense FP8 GEMM
    for m in [1, 16, 64]:
        xa = torch.randn(m, H, device=dev).to(torch.float8_e4m3fn)
        w = gu[0].t().contiguous()  # [N, K]
        t = per_launch(partial(torch._scaled_mm, xa, w.t(), scale_a=s, scale_b=s, out_dtype=torch.bfloat16))
        res.setdefault("cublas_one_expert_gate_up", {})[m] = {"us": round(t * 1e6, 2),
                                                               "TBps": round(w.numel() / t / 1e12, 3)}
    with open(os.path.join(os.environ.get("OUT", "."), "moe_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "sweep"}, indent=1))


def split_sweep(gu, dn, one, s) -> dict:
    """Decode (one token): tiles x split-K for both GEMMs, against the one-expert weight-streaming floor."""
    ids = torch.zeros(1, 1, dtype=torch.int64, device="cuda")
    sp, be = fm.align_by_expert(ids, E, 16)
    scores = torch.ones(1, device="cuda")
    best = {}
    for gemm, w in {"gate_up": gu, "down": dn}.items():
        k, n = w.shape[1], w.shape[2]
        a = torch.randn(1, k, device="cuda").to(torch.float8_e4m3fn)
        rows = []
        for bn, bk, split, ns in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8, 16), (3, 4)):
            out = torch.empty((split, 1, n) if split > 1 else (1, n), device="cuda",
                              dtype=torch.float32 if split > 1 else torch.bfloat16)
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": ns, "SPLIT_K": split}
            try:
                t = per_launch(partial(fm._gemm, a, w, out, sp, be, scores, 1, False, False, s, one, 16,
                                       config=cfg))
            except Exception as exc:  # out of shared memory etc.
                rows.append({**cfg, "error": type(exc).__name__})
                continue
            rows.append({**cfg, "us": round(t * 1e6, 2), "TBps": round(k * n / t / 1e12, 3)})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        default = fm._launch(1, n, k, E)
        same = [r for r in ok if all(r[c] == default[c] for c in ("BLOCK_N", "BLOCK_K", "num_stages", "SPLIT_K"))]
        best[gemm] = {"best": ok[:5], "default": {**default, "us": same[0]["us"] if same else None}}
        print("split sweep", gemm, "best", ok[:3], "default", best[gemm]["default"], flush=True)
    return best


if __name__ == "__main__":
    main()
