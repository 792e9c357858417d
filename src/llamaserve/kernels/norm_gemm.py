"""A decode step's input RMSNorm inside the next projection's GEMM (Llama 4's input norm + qkv): one kernel.

At one token the RMSNorm is a ~3 us kernel on the critical path of every layer, doing next to no work (H200
Scout timeline, docs/performance.md). Here each program of the one-token GEMM normalizes the step's rows itself
(at most `MAX_ROWS`, a few KB each, read from L2): x (+ x2, the MoE's pending shared-expert output) + residual,
`rms_normalize` and the FP8 rounding of kernels/norm_act.py (so the GEMM's input is the bytes `rms_norm` would
have written), stored to the program's own scratch rows; then the weight stream of kernels/moe_decode.py's decode
GEMM over that scratch (one program per BLOCK_N output columns, all of K). Program 0 also writes x + residual to
a new buffer (the residual is read by every program, so it is not updated in place).

The reference is `rms_norm` followed by the layer's own GEMM (`torch._scaled_mm` for FP8, `x @ W^T` for float
weights); the two agree up to the GEMM's summation order. Off by default until measured on the GPU:
LLAMASERVE_NORM_QKV=1 turns it on for Llama 4 (models/llama4.py); LLAMASERVE_NORM_QKV_CONFIG =
"BLOCK_NxBLOCK_KxWARPSxSTAGES" sets the launch (default 32x256x4x4); LLAMASERVE_NORM_QKV_PDL=1 launches it as a
programmatic dependent (kernels/pdl.py; off by default, as for the other decode GEMMs). Each program calls
`gdc_launch_dependents` first (pdl.trigger_early), so the split decode attention after it, a
PDL launch, can start and read its metadata and RoPE tables while the qkv weights stream.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llamaserve.kernels.moe_decode import fit_stages, launch_from_env, stream_k
from llamaserve.kernels.norm_act import _store_out, rms_normalize
from llamaserve.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_args, trigger_early

MAX_ROWS = 4  # rows are normalized one after another by every program: beyond a few, a separate norm is faster


@triton.jit
def _norm_gemm_kernel(X, X2, R, NW, RNew, A, W, Out, S, WScale, num_rows, N, K, eps,
                      stride_x, stride_x2, stride_r, stride_rn, stride_ap, stride_wk, stride_wn, stride_om,
                      HAS_X2: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FP8: tl.constexpr, EVEN: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PDL: tl.constexpr = False, TRIGGER: tl.constexpr = False):
    pid = tl.program_id(0)
    if TRIGGER:  # the next kernel (attention, a PDL launch) may start its part before its wait beside this one
        gdc_launch_dependents()
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < K
    a_base = A + pid.to(tl.int64) * stride_ap  # this program's normalized rows [num_rows, K]
    nw = tl.load(NW + hc, mask=hmask, other=0.0)  # what no earlier kernel writes, first (pdl.early_loads)
    s = None
    if FP8:
        s = tl.load(S)
    if PDL:  # a programmatic dependent (kernels/pdl.py): x, x2 and the residual are earlier kernels' outputs
        gdc_wait()
    for r in range(0, num_rows):  # kernels/norm_act.py's _rms_norm_kernel, row by row
        x = tl.load(X + r * stride_x + hc, mask=hmask, other=0.0)
        if HAS_X2:
            x2 = tl.load(X2 + r * stride_x2 + hc, mask=hmask, other=0.0)
            x = (x.to(tl.float32) + x2.to(tl.float32)).to(X.dtype.element_ty)
        if HAS_RESIDUAL:
            x = x + tl.load(R + r * stride_r + hc, mask=hmask, other=0.0)
            if pid == 0:
                tl.store(RNew + r * stride_rn + hc, x, mask=hmask)
        y = rms_normalize(x, NW, hc, hmask, K, eps, nw)
        _store_out(a_base, r * K + hc, y, hmask, S, FP8, s)
    tl.debug_barrier()  # the scratch rows, written by all of this program's threads, are read by all of them
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    acc, _, cols, col_ok = stream_k(a_base, K, W, pid * 0, 0, stride_wk, stride_wn, rows, row_ok, pid, N, K, 0, S,
                                    WScale, FP8, False, EVEN, PREC, BLOCK_M, BLOCK_N, BLOCK_K, True)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


def enabled() -> bool:
    """LLAMASERVE_NORM_QKV=1: Llama 4's decode steps of at most MAX_ROWS tokens take this kernel."""
    return os.environ.get("LLAMASERVE_NORM_QKV", "0") == "1"


def norm_gemm_config(k: int, a_bytes: int, w_bytes: int) -> dict:
    """Launch parameters: 32 output columns per program (224 programs for Scout's qkv), 256-wide K steps, 4 warps,
    4 stages (a first guess, to be swept on the GPU); LLAMASERVE_NORM_QKV_CONFIG overrides them."""
    block_n, block_k, warps, stages = launch_from_env("LLAMASERVE_NORM_QKV_CONFIG", (32, 256, 4, 4))
    block_k, stages = fit_stages(block_k, stages, k, 16 * a_bytes + block_n * w_bytes)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, add: torch.Tensor | None,
                norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, w_scale: torch.Tensor | None,
                a_scale: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """y = RMSNorm(x + add + residual) @ weight^T for x [T <= MAX_ROWS, K]; weight [N, K] (K contiguous), FP8 with
    per-tensor `w_scale` and the static input scale `a_scale` (the normalized rows rounded to FP8 with it), or
    float (then both scales are None). Returns (y [T, N] in out_dtype, x + add + residual as a new tensor; x + add
    itself when there is no residual)."""
    t, k = x.shape
    n = weight.shape[0]
    assert 0 < t <= MAX_ROWS and weight.shape[1] == k and weight.stride(1) == 1
    fp8 = weight.dtype == torch.float8_e4m3fn
    assert fp8 == (a_scale is not None) == (w_scale is not None), "FP8 weights take both scales, float neither"
    new_residual = torch.empty_like(x) if residual is not None else x
    if residual is None and add is not None:  # nothing to add the pending part to: add it here
        new_residual = (x.float() + add.float()).to(x.dtype)
        x, add = new_residual, None
    cfg = norm_gemm_config(k, 1 if fp8 else x.element_size(), weight.element_size())
    grid = triton.cdiv(n, cfg["BLOCK_N"])
    scratch = torch.empty((grid, t, k), dtype=weight.dtype if fp8 else x.dtype, device=x.device)
    out = torch.empty((t, n), dtype=out_dtype, device=x.device)
    even = k % cfg["BLOCK_K"] == 0 and n % cfg["BLOCK_N"] == 0
    x2 = add if add is not None else x
    # not a programmatic dependent by default: the decode GEMMs launched so measured slower (kernels/pdl.py)
    pdl = pdl_args(x.device) if os.environ.get("LLAMASERVE_NORM_QKV_PDL") == "1" else {}
    r = residual if residual is not None else x
    trigger = trigger_early(x.device)
    _norm_gemm_kernel[(grid,)](
        x, x2, r, norm_weight, new_residual, scratch, weight, out, a_scale if fp8 else x, w_scale if fp8 else x,
        t, n, k, eps, x.stride(0), x2.stride(0), r.stride(0), new_residual.stride(0), scratch.stride(0),
        weight.stride(1), weight.stride(0), out.stride(0), HAS_X2=add is not None, HAS_RESIDUAL=residual is not None,
        FP8=fp8, EVEN=even, PREC="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_H=triton.next_power_of_2(k), BLOCK_M=16, TRIGGER=trigger, **cfg, **pdl)
    return out, new_residual
