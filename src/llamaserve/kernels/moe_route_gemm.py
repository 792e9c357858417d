"""Top-1 routing inside the routed experts' gate-up GEMM of a decode step: one launch instead of two.

kernels/moe_decode.py routes a decode step in `_route_scale_kernel` (top-1 expert and sigmoid score from the
router's logits, A = x * score quantized to FP8), then streams the chosen experts' gate-up weights. At batch 1 on
the H200 the routing kernel sits on the routed chain's critical path for ~8.5 us (2 us alone: it runs behind the
shared expert's gate-up traffic), and the routed chain ends last (docs/performance.md). Here every program of the
gate-up GEMM routes the step itself from the logits (a [16, E] tile), and writes x * score for the rows of its own
expert, rounded as `_route_scale_kernel` rounds them, to its column tile's scratch rows, once; then the decode
GEMM's loop (`stream_k`) and GLU epilogue (`glu_out`) run over them. (An earlier try that scaled and quantized a
16-row tile at every K step was ALU-bound: 84.6 against 34 us.) Program (0, 0) writes the ids and scores the down
projection reads. Each row is written by the one program of its expert and column tile, and read only by it.

The results are those of `_route_scale_kernel` + `_decode_gemm_kernel` bit for bit (same roundings, same loop).
Off by default until timed on the GPU: LLAMASERVE_MOE_ROUTE_IN_GEMM=1 turns it on (`fused_moe_decode`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llamaserve.kernels.fused_moe import top1_rows
from llamaserve.kernels.moe_decode import decode_config, glu_out, stream_k
from llamaserve.kernels.norm_act import round_e4m3
from llamaserve.kernels.pdl import early_loads


@triton.jit
def _route_glu_kernel(X, Logits, Ids, Scores, S, Scratch, W, Out, WScale, OScale, Ref, num_pairs, N, K, up_off,
                      stride_x, stride_l, stride_sp, stride_we, stride_wk, stride_wn, stride_om, E: tl.constexpr,
                      FP8: tl.constexpr, QUANT_OUT: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EARLY: tl.constexpr = False):
    p = tl.program_id(0)
    o_s = None
    if EARLY and QUANT_OUT:  # the output scale now, not after the loop (pdl.early_loads)
        o_s = tl.load(OScale)
    nt = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    live = rows < num_pairs
    ids, scores = top1_rows(Logits, rows, live, stride_l, E, BLOCK_E)  # as _route_scale_kernel routes
    ids = tl.where(live, ids, -1)
    if (p == 0) & (nt == 0):
        tl.store(Ids + rows, ids.to(Ids.dtype.element_ty), mask=live)
        tl.store(Scores + rows, scores, mask=live)
    e = tl.sum(tl.where(rows == p, ids, 0), axis=0)
    if tl.sum(((ids == e) & (rows < p)).to(tl.int32), axis=0) > 0:
        return  # an earlier token has this expert: its program computes every row of the expert
    row_ok = ids == e
    scratch = Scratch + nt.to(tl.int64) * stride_sp  # this column tile's rows [num_pairs, K]
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < K
    for r in range(0, num_pairs):  # the rows of this expert: A = x * score (in x's dtype), FP8 with S
        if tl.sum(tl.where(rows == r, ids, 0), axis=0) == e:
            score = tl.sum(tl.where(rows == r, scores, 0.0), axis=0)
            x = tl.load(X + r * stride_x + hc, mask=hmask, other=0.0)
            a = (x.to(tl.float32) * score).to(X.dtype.element_ty)
            if FP8:
                a = round_e4m3(a.to(tl.float32) / tl.load(S))
            tl.store(scratch + r * K + hc, a.to(Scratch.dtype.element_ty), mask=hmask)
    tl.debug_barrier()  # the scratch rows, written by all of this program's threads, are read by all of them
    acc, acc_u, cols, col_ok = stream_k(scratch, K, W, e, stride_we, stride_wk, stride_wn, rows, row_ok, nt, N, K,
                                        up_off, S, WScale, FP8, True, EVEN, PREC, BLOCK_M, BLOCK_N, BLOCK_K,
                                        EARLY)
    y = glu_out(acc, acc_u, Ref, OScale, QUANT_OUT, o_s)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


def enabled() -> bool:
    """LLAMASERVE_MOE_ROUTE_IN_GEMM=1: decode steps routed from logits take `route_gate_up`."""
    return os.environ.get("LLAMASERVE_MOE_ROUTE_IN_GEMM", "0") == "1"


def route_gate_up(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, w_scale: torch.Tensor | None,
                  a_scale: torch.Tensor | None, act: torch.Tensor, out_scale: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes x [T, H] from logits [T, E] (top-1, sigmoid score) and writes silu(gate) * up of each token's expert
    into act [T, I] (FP8 with `out_scale`, else x's dtype); gate_up [E, H, 2I] with any strides (the model's:
    K contiguous), FP8 with per-expert `w_scale` and the static input scale `a_scale`, or float. Returns (ids [T]
    int64, scores [T] float32), as `_route_scale_kernel` writes them."""
    t, h = x.shape
    num_experts, _, two_i = gate_up.shape
    inter = two_i // 2
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    assert fp8 == (a_scale is not None), "FP8 experts take the static input scale, float ones none"
    ids = torch.empty(t, dtype=torch.int64, device=x.device)
    scores = torch.empty(t, dtype=torch.float32, device=x.device)
    cfg = decode_config(inter, h, True, 1 if fp8 else x.element_size(), gate_up.element_size())
    tiles = triton.cdiv(inter, cfg["BLOCK_N"])
    scratch = torch.empty((tiles, t, h), dtype=gate_up.dtype if fp8 else x.dtype, device=x.device)
    even = h % cfg["BLOCK_K"] == 0 and inter % cfg["BLOCK_N"] == 0
    _route_glu_kernel[(t, tiles)](
        x, logits, ids, scores, a_scale if fp8 else scores, scratch, gate_up, act,
        w_scale if fp8 else scores, out_scale if out_scale is not None else scores, x, t, inter, h,
        inter * gate_up.stride(2), x.stride(0), logits.stride(0), scratch.stride(0), gate_up.stride(0),
        gate_up.stride(1), gate_up.stride(2), act.stride(0), E=num_experts, FP8=fp8,
        QUANT_OUT=out_scale is not None, EVEN=even, PREC="ieee" if gate_up.dtype == torch.float32 else "tf32",
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_H=triton.next_power_of_2(h), BLOCK_M=16,
        EARLY=early_loads(), **cfg)
    return ids, scores
