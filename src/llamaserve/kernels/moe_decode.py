"""Fused MoE for decode-sized steps (top-1 routing, at most `DECODE_MAX_PAIRS` tokens): weight streams, no sort.

With a handful of tokens the grouped GEMM of kernels/fused_moe.py is mostly overhead: a one-program alignment
kernel, a grid sized for the worst-case block count (at one token 16 of its 17 row blocks exit at once), split-K
float32 partials and two more kernels to sum them: at one token a Scout MoE layer took 81 us in a CUDA graph on the
H200, against 49 us here (floor 30; benchmarks/decode_bench.py). Here every token's expert is known from its own
row, so three kernels do the whole step:

1. `_route_scale_kernel` (one program per token and 1,024 columns): the top-1 expert and its sigmoid score from
   the router logits (or the given ids / scores), and A = x * score rounded to x's dtype, quantized to FP8 with the
   per-tensor input scale for FP8 experts.
2. `_decode_gemm_kernel` with GLU: program (p, n) streams expert e = ids[p]'s gate and up columns
   [n * BLOCK_N, (n + 1) * BLOCK_N) over all of K (K-contiguous rows: each program reads two contiguous bands
   of W) for every token routed to e (a 16-row tile, rows of other experts masked; when tokens share an expert,
   only the program of the first such token runs, so each expert's weights are read once), and writes
   silu(gate) * up, rounded as the reference rounds it, in FP8 (static scale) or the model dtype.
3. The same kernel without GLU for the down projection, adding the shared expert's output in its epilogue; at one
   token with FP8 experts, `_down_gemv_kernel` instead (a GEMV with float16 products, as kernels/gemv.py's HALF
   form: alone on Scout's [5,120 x 8,192] 12.7 us against the decode GEMM's 15.0; in the step 0.05-0.10 ms
   faster, 5.167 / 5.171 against 5.268 ms, H200 2026-12-01; LLAMASERVE_MOE_DOWN_GEMV=0 turns it off). The
   gate-ups in that form (with the GLU epilogue) lost in the step and were removed (docs/performance.md).

`router_logits` computes the router's logits for such steps in one kernel (`norm_router`: with the RMSNorm before
it, one launch), and `glu_decode` runs a dense gate-up
layer with its SiLU through the same GEMM kernel (one "expert"): layers/moe.py uses both for Llama 4.
Launch parameters: `decode_config` (H200 sweep, benchmarks/decode_bench.py). The GEMM's weight stream (`stream_k`)
and GLU epilogue (`glu_out`) are jit helpers. Reference:
layers/moe.py `fused_experts_torch` / `fused_experts_fp8_torch`, the same as kernels/fused_moe.py's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from llamaserve.kernels import launch_from_env
from llamaserve.kernels.gemv import HALF_MAX_SLICES, fp8_rows_dot, half_fits
from llamaserve.kernels.norm_act import _store_out, norm_warps, rms_normalize, round_e4m3
from llamaserve.kernels.pdl import early_loads, gdc_launch_dependents, gdc_wait, gemv_pdl, pdl_args, trigger_early

DECODE_MAX_PAIRS = 16  # one 16-row tile holds every token of the step
DOWN_GEMV_LAUNCH = (4, 1024, 4)  # the one-token routed down as a GEMV: (BLOCK_N, BLOCK_K, warps)
SMEM_BYTES = 200 * 1024


@triton.jit
def _route_scale_kernel(X, Logits, Ids, Scores, S, A, stride_x, stride_l, stride_a, H, E: tl.constexpr,
                        FROM_LOGITS: tl.constexpr, QUANT: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    t = tl.program_id(0)
    chunk = tl.program_id(1)
    s = None
    if EARLY and QUANT:  # the static input scale before the wait (pdl.early_loads)
        s = tl.load(S)
    if PDL:  # a programmatic dependent (kernels/pdl.py): the logits and x are the previous kernel's outputs
        gdc_wait()
    if FROM_LOGITS:  # the first largest logit; score = sigmoid(logit) rounded to the logits' dtype
        ee = tl.arange(0, BLOCK_E)
        lg = tl.load(Logits + t * stride_l + ee, mask=ee < E, other=float("-inf")).to(tl.float32)
        best = tl.max(lg, axis=0)
        idx = tl.min(tl.where(lg == best, ee, BLOCK_E), axis=0)
        score = tl.sigmoid(best).to(Logits.dtype.element_ty).to(tl.float32)
        if chunk == 0:
            tl.store(Ids + t, idx.to(Ids.dtype.element_ty))
            tl.store(Scores + t, score)
    else:
        score = tl.load(Scores + t).to(tl.float32)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + t.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    a = (x.to(tl.float32) * score).to(X.dtype.element_ty)  # as the reference's x * score in x's dtype
    if QUANT:
        if s is None:
            s = tl.load(S)
        a = round_e4m3(a.to(tl.float32) / s)
    tl.store(A + t.to(tl.int64) * stride_a + cols, a.to(A.dtype.element_ty), mask=mask)


@triton.jit
def stream_k(A, stride_am, W, e, stride_we, stride_wk, stride_wn, rows, row_ok, n_tile, N, K, up_off, AScale,
             WScale, FP8: tl.constexpr, GLU: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EARLY: tl.constexpr = False):
    """The decode GEMM's weight stream: A's rows [BLOCK_M, K] (`row_ok`) times expert e's columns
    [n_tile * BLOCK_N, +BLOCK_N) of W over all of K, BLOCK_K at a time; GLU: also the up columns `up_off` elements
    after the gate columns. Returns the float32 (gate, up) accumulators, scaled by AScale * WScale[e] for FP8 (up
    is zeros without GLU), and the tile's columns and their mask. EARLY (pdl.early_loads): the scales are loaded
    before the loop, not after it (where their L2 round trip is the program's last wait before its store)."""
    scale = None
    if FP8 and EARLY:
        scale = tl.load(AScale) * tl.load(WScale + e)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + kk[None, :]
    w_ptrs = W + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk)
        else:
            k_ok = (k0 + kk) < K
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PREC)
        if GLU:
            if EVEN:
                wu = tl.load(w_ptrs + up_off + k0 * stride_wk)
            else:
                wu = tl.load(w_ptrs + up_off + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_u += tl.dot(a, wu, input_precision=PREC)
    if FP8:
        if scale is None:
            scale = tl.load(AScale) * tl.load(WScale + e)
        acc = acc * scale
        acc_u = acc_u * scale
    return acc, acc_u, cols, col_ok


@triton.jit
def glu_out(acc, acc_u, Ref, OScale, QUANT_OUT: tl.constexpr, o_s=None):
    """silu(gate) * up from the float32 accumulators with the reference's roundings to Ref's dtype (the model's):
    GEMM output, silu, product; QUANT_OUT: then to FP8 values with the static scale OScale (`o_s`: already
    loaded)."""
    dt = Ref.dtype.element_ty
    g = acc.to(dt).to(tl.float32)
    y = (g / (1.0 + tl.exp(-g))).to(dt) * acc_u.to(dt)
    if QUANT_OUT:
        if o_s is None:
            o_s = tl.load(OScale)
        y = round_e4m3(y.to(tl.float32) / o_s)
    return y


@triton.jit
def _decode_gemm_kernel(A, W, Out, Ids, AScale, WScale, Add, OScale, Ref, num_pairs, N, K, up_off,
                        stride_am, stride_we, stride_wk, stride_wn, stride_om, stride_add,
                        FP8: tl.constexpr, GLU: tl.constexpr, ADD: tl.constexpr, QUANT_OUT: tl.constexpr,
                        SINGLE: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRIGGER: tl.constexpr = False,
                        EARLY: tl.constexpr = False):
    if TRIGGER:  # the next kernel, a PDL launch, may start its part before its wait beside this one
        gdc_launch_dependents()
    o_s = None
    if EARLY and QUANT_OUT:  # the output scale now, not after the loop (pdl.early_loads)
        o_s = tl.load(OScale)
    p = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    if SINGLE:  # a dense layer: one "expert" for every row
        e = p * 0
        row_ok = rows < num_pairs
    else:
        ids = tl.load(Ids + rows, mask=rows < num_pairs, other=-1)
        e = tl.load(Ids + p)
        if tl.sum(((ids == e) & (rows < p)).to(tl.int32), axis=0) > 0:
            return  # an earlier token has this expert: its program computes every row of the expert
        row_ok = ids == e
    acc, acc_u, cols, col_ok = stream_k(A, stride_am, W, e, stride_we, stride_wk, stride_wn, rows, row_ok,
                                        tl.program_id(1), N, K, up_off, AScale, WScale, FP8, GLU, EVEN, PREC,
                                        BLOCK_M, BLOCK_N, BLOCK_K, EARLY)
    mask = row_ok[:, None] & col_ok[None, :]
    dt = Ref.dtype.element_ty  # the model dtype, where the reference rounds
    if GLU:
        y = glu_out(acc, acc_u, Ref, OScale, QUANT_OUT, o_s)
    else:
        y = acc.to(dt)
        if ADD:  # the shared expert's output, added as the reference's `shared + routed` in the model dtype
            add = tl.load(Add + rows[:, None] * stride_add + cols[None, :], mask=mask, other=0.0)
            y = (y.to(tl.float32) + add.to(tl.float32)).to(dt)
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _expert_rows(Ids, AScale, WScale, W, N, stride_we, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A one-token GEMV program's expert (ids[0]), its FP8 scale (AScale times WScale[e]), its BLOCK_N rows, their
    mask and their first slice's pointers (K-contiguous rows)."""
    e = tl.load(Ids).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_ptrs = W + e * stride_we + rows[:, None].to(tl.int64) * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    return tl.load(AScale) * tl.load(WScale + e), rows, rows < N, w_ptrs


@triton.jit
def _down_gemv_kernel(A, W, Out, Ids, AScale, WScale, Add, Ref, N, stride_we, stride_wn, K: tl.constexpr,
                      ADD: tl.constexpr, TRIGGER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr = False):
    """The routed down projection of one token as a GEMV (LLAMASERVE_MOE_DOWN_GEMV): program p owns BLOCK_N
    output features of expert ids[0]'s K-contiguous rows, float16 products (kernels/gemv.py `fp8_rows_dot`), then
    both scales and the shared expert's output added as `_decode_gemm_kernel` adds it."""
    if TRIGGER:
        gdc_launch_dependents()
    if PDL:  # a programmatic dependent (kernels/pdl.py gemv_pdl)
        gdc_wait()
    scale, rows, row_ok, w_ptrs = _expert_rows(Ids, AScale, WScale, W, N, stride_we, stride_wn, BLOCK_N, BLOCK_K)
    dt = Ref.dtype.element_ty
    y = (fp8_rows_dot(w_ptrs, A, row_ok, K, BLOCK_N, BLOCK_K) * scale).to(dt)
    if ADD:
        y = (y.to(tl.float32) + tl.load(Add + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dt)
    tl.store(Out + rows, y.to(Out.dtype.element_ty), mask=row_ok)


def _check_slices(name: str, k: int, block_k: int) -> None:
    """The float16 row dot's bound (kernels/gemv.py `half_fits`), named for the launch switch that set BLOCK_K."""
    if not half_fits(k, block_k):
        raise ValueError(f"{name}: BLOCK_K = {block_k} cuts K = {k} into more than {HALF_MAX_SLICES} slices "
                         f"(float16 sums could overflow); give a BLOCK_K of at least {-(-k // HALF_MAX_SLICES)}")


def down_gemv_launch() -> tuple[int, int, int] | None:
    """LLAMASERVE_MOE_DOWN_GEMV: unset or 1, a one-token routed down projection takes the GEMV at DOWN_GEMV_LAUNCH;
    BLOCK_NxBLOCK_KxWARPS, the GEMV at that launch; 0, the decode GEMM."""
    value = os.environ.get("LLAMASERVE_MOE_DOWN_GEMV", "1")
    if value == "0":
        return None
    if value == "1":
        return DOWN_GEMV_LAUNCH
    return launch_from_env("LLAMASERVE_MOE_DOWN_GEMV", DOWN_GEMV_LAUNCH, "BLOCK_NxBLOCK_KxWARPS")


@triton.jit
def _router_kernel(X, W, Y, stride_x, stride_w, stride_y, H, BLOCK: tl.constexpr):
    """Y[t, e] = x[t] . W[e] (float32 sum, rounded to Y's dtype): one program per (token, expert)."""
    t = tl.program_id(0)
    e = tl.program_id(1)
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, H, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(X + t * stride_x + cols, mask=mask, other=0.0)
        w = tl.load(W + e * stride_w + cols, mask=mask, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + t * stride_y + e, tl.sum(acc, axis=0).to(Y.dtype.element_ty))


@triton.jit
def _norm_router_kernel(X, R, NW, RW, Y, Y8, S8, Logits, RNew, stride_x, stride_r, stride_rw, stride_y, stride_y8,
                        stride_l, stride_rn, H, eps, HAS_COPY: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False, EARLY: tl.constexpr = False, TRIGGER: tl.constexpr = False):
    """Program (t, e): y = RMSNorm(x + residual) of token t (kernels/norm_act.py's arithmetic) and the router's
    logit y . W_e (float32 sum rounded to the logits' dtype, as `_router_kernel`). Program (t, 0) also writes
    x + residual to RNew (a new buffer: R is read by every program), y, and y in FP8 with S8 (HAS_COPY)."""
    if TRIGGER:  # the routing kernel after it (a PDL launch) may start beside it (pdl.trigger_early)
        gdc_launch_dependents()
    t = tl.program_id(0)
    e = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(RW + e * stride_rw + cols, mask=mask, other=0.0)  # a weight: before the wait
    nw, s8 = None, None
    if EARLY:  # the norm weight and the copy's scale too (pdl.early_loads)
        nw = tl.load(NW + cols, mask=mask, other=0.0)
        if HAS_COPY:
            s8 = tl.load(S8)
    if PDL:  # a programmatic dependent (kernels/pdl.py): x is the previous kernel's output
        gdc_wait()
    x = tl.load(X + t * stride_x + cols, mask=mask, other=0.0)
    x = x + tl.load(R + t * stride_r + cols, mask=mask, other=0.0)
    y = rms_normalize(x, NW, cols, mask, H, eps, nw)
    logit = tl.sum(y.to(tl.float32) * w.to(tl.float32), axis=0)
    tl.store(Logits + t * stride_l + e, logit.to(Logits.dtype.element_ty))
    if e == 0:
        tl.store(RNew + t * stride_rn + cols, x, mask=mask)
        tl.store(Y + t * stride_y + cols, y, mask=mask)
        if HAS_COPY:
            _store_out(Y8, t * stride_y8 + cols, y, mask, S8, True, s8)


def norm_router(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                router_weight: torch.Tensor, fp8_copy: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A decode step's post-attention RMSNorm (with the residual add) and the router's logits in one launch:
    returns (y = norm(x + residual), y in FP8 with `fp8_copy` or None, logits [T, E] in x's dtype, x + residual
    as a new tensor). Each of the E programs of a token normalizes the row itself (a few KB from L2) instead of
    waiting for a norm kernel; the routing stays in `_route_scale_kernel`, after the shared expert's fork (routing
    there staggers the two gate-up streams, which measured faster than starting both at once). Llama 4 at decode
    size (models/llama4.py); the same results as `rms_norm` then `router_logits` up to summation order."""
    t, h = x.shape
    num_experts = router_weight.shape[0]
    y = torch.empty_like(x)
    y8 = torch.empty((t, h), dtype=torch.float8_e4m3fn, device=x.device) if fp8_copy is not None else None
    logits = torch.empty((t, num_experts), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x)
    if t:
        block = triton.next_power_of_2(h)
        _norm_router_kernel[(t, num_experts)](
            x, residual, norm_weight, router_weight, y, y8 if y8 is not None else y,
            fp8_copy if fp8_copy is not None else norm_weight, logits, new_residual, x.stride(0), residual.stride(0),
            router_weight.stride(0), y.stride(0), y8.stride(0) if y8 is not None else 0, logits.stride(0),
            new_residual.stride(0), h, eps, HAS_COPY=fp8_copy is not None, BLOCK=block, num_warps=norm_warps(block),
            EARLY=early_loads(), TRIGGER=trigger_early(x.device), **pdl_args(x.device))
    return y, y8, logits, new_residual


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] @ weight[E, H]^T in x's dtype, for decode-sized T: one small kernel (cuBLAS takes two at one
    token, a split-K GEMM and its reduction)."""
    t, h = x.shape
    y = torch.empty((t, weight.shape[0]), dtype=x.dtype, device=x.device)
    if t:
        block = min(8192, triton.next_power_of_2(h))  # Scout's 5,120: all loads in flight at once
        _router_kernel[(t, weight.shape[0])](x, weight, y, x.stride(0), weight.stride(0), y.stride(0), h,
                                             BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return y


def fit_stages(block_k: int, stages: int, k: int, bytes_per_k: int) -> tuple[int, int]:
    """BLOCK_K capped at K (rounded up to a power of two, at least 16), then narrower K steps, then fewer stages,
    until `stages` pipeline stages of `bytes_per_k` bytes per K element fit `SMEM_BYTES`."""
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    while stages * block_k * bytes_per_k > SMEM_BYTES:
        if block_k > 128:
            block_k //= 2
        elif stages > 2:
            stages -= 1
        else:
            block_k //= 2
    return block_k, stages


def decode_config(n: int, k: int, glu: bool, a_bytes: int, w_bytes: int) -> dict:
    """Launch parameters from the H200 sweep at one token (benchmarks/decode_bench.py, CUDA graphs, 16 experts
    rotated): gate-up with SiLU 32 + 32 columns per program, 128-wide K steps, 2 warps, 6 stages: 22.9 us for one
    Scout expert (3.66 TB/s; cuBLAS on the same matrix 22.4 us); down 64 columns, 512-wide K steps, 4 warps, 4
    stages: 14.9 us (2.81 TB/s; cuBLAS 13.5). Narrower K steps, then fewer stages, when the stages would not fit
    `SMEM_BYTES` (bf16 / fp32 operands) or K is small. LLAMASERVE_MOE_DECODE_GLU / LLAMASERVE_MOE_DECODE_DOWN =
    "BLOCK_NxBLOCK_KxWARPSxSTAGES" (e.g. 64x512x4x4) override the defaults, for sweeps inside a whole model step
    (H200 Scout batch 1, 2026-12-01: every other launch tried was slower; docs/performance.md)."""
    name = "LLAMASERVE_MOE_DECODE_GLU" if glu else "LLAMASERVE_MOE_DECODE_DOWN"
    block_n, block_k, warps, stages = launch_from_env(name, (32, 128, 2, 6) if glu else (64, 512, 4, 4),
                                                      "BLOCK_NxBLOCK_KxWARPSxSTAGES")
    block_k, stages = fit_stages(block_k, stages, k, 16 * a_bytes + (2 if glu else 1) * block_n * w_bytes)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ids: torch.Tensor | None, n: int, glu: bool,
          a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, ref: torch.Tensor,
          add: torch.Tensor | None = None, out_scale: torch.Tensor | None = None, config: dict | None = None,
          trigger: bool = False) -> None:
    """out[p, :n] = A[p] @ W[ids[p]][:, :n] (GLU: silu of those columns times columns n..2n); ids None: every
    row takes W[0] (a dense layer). `trigger`: let the next kernel launch early (pdl.trigger_early)."""
    num_pairs, k = a.shape
    cfg = dict(config or decode_config(n, k, glu, a.element_size(), w.element_size()))
    fp8 = w.dtype == torch.float8_e4m3fn
    even = k % cfg["BLOCK_K"] == 0 and n % cfg["BLOCK_N"] == 0
    grid = (num_pairs if ids is not None else 1, triton.cdiv(n, cfg["BLOCK_N"]))
    dummy = ids if ids is not None else a
    _decode_gemm_kernel[grid](
        a, w, out, dummy, a_scale if fp8 else dummy, w_scale if fp8 else dummy, add if add is not None else dummy,
        out_scale if out_scale is not None else dummy, ref, num_pairs, n, k, n * w.stride(2), a.stride(0),
        w.stride(0), w.stride(1), w.stride(2), out.stride(0), add.stride(0) if add is not None else 0,
        FP8=fp8, GLU=glu, ADD=add is not None, QUANT_OUT=out_scale is not None, SINGLE=ids is None, EVEN=even,
        PREC="ieee" if w.dtype == torch.float32 else "tf32", BLOCK_M=16, TRIGGER=trigger, EARLY=early_loads(),
        **cfg)


def fused_moe_decode(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor | None,
                     top_scores: torch.Tensor | None, gate_up_scale: torch.Tensor | None,
                     down_scale: torch.Tensor | None, a1_scale: torch.Tensor | None, a2_scale: torch.Tensor | None,
                     shared: torch.Tensor | Callable[[], torch.Tensor] | None,
                     router_logits: torch.Tensor | None) -> torch.Tensor:
    """kernels/fused_moe.py's `fused_moe` for top-1 routing and 1..DECODE_MAX_PAIRS tokens (same arguments; a
    callable `shared` is called right before the down GEMM, which adds its result)."""
    from llamaserve.layers.quantization import dynamic_scale

    t, h = x.shape
    num_experts, _, two_i = gate_up.shape
    inter = two_i // 2
    assert 0 < t <= DECODE_MAX_PAIRS and (top_ids is None or top_ids.shape[1] == 1)
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    s1 = (a1_scale if a1_scale is not None else dynamic_scale(x)) if fp8 else None
    from_logits = router_logits is not None
    s2 = a2_scale if fp8 else None
    act = torch.empty((t, inter), dtype=torch.float8_e4m3fn if s2 is not None else x.dtype, device=x.device)
    if from_logits:
        ids = torch.empty(t, dtype=torch.int64, device=x.device)
        scores = torch.empty(t, dtype=torch.float32, device=x.device)
    else:
        ids, scores = top_ids.reshape(-1).contiguous(), top_scores.reshape(-1).contiguous()
    a = torch.empty((t, h), dtype=gate_up.dtype if fp8 else x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(h))
    _route_scale_kernel[(t, triton.cdiv(h, block))](
        x, router_logits if from_logits else x, ids, scores, s1 if fp8 else scores, a, x.stride(0),
        router_logits.stride(0) if from_logits else 0, a.stride(0), h, E=num_experts, FROM_LOGITS=from_logits,
        QUANT=fp8, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK=block, EARLY=early_loads(),
        **pdl_args(x.device))
    _gemm(a, gate_up, act, ids, inter, True, s1, gate_up_scale, x, out_scale=s2)
    return _down(act, down, ids, x, s2, down_scale, shared, fp8)


def _down(act: torch.Tensor, down: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, s2: torch.Tensor | None,
          down_scale: torch.Tensor | None, shared: torch.Tensor | Callable[[], torch.Tensor] | None,
          fp8: bool) -> torch.Tensor:
    """The routed down projection of `fused_moe_decode` (the activation quantized first when its scale is
    dynamic), adding the shared expert's output. It calls `gdc_launch_dependents` first, so the next layer's input
    norm (a PDL launch) can start and load its weight while the down weights stream (pdl.trigger_early)."""
    from llamaserve.layers.quantization import dynamic_scale, quantize_fp8

    if fp8 and s2 is None:  # dynamic: the activation's amax first
        s2 = dynamic_scale(act)
        act = quantize_fp8(act, s2)
    out = torch.empty_like(x)
    add = shared() if callable(shared) else shared
    launch = down_gemv_launch() if fp8 and act.shape[0] == 1 and down.stride(1) == 1 else None
    if launch is not None:
        bn, bk, warps = launch
        n, k = down.shape[2], down.shape[1]
        _check_slices("LLAMASERVE_MOE_DOWN_GEMV", k, bk)
        _down_gemv_kernel[(triton.cdiv(n, bn),)](
            act, down, out, ids, s2, down_scale, add if add is not None else out, x, n, down.stride(0),
            down.stride(2), K=k, ADD=add is not None, TRIGGER=trigger_early(x.device), BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, **gemv_pdl(x.device))
        return out
    _gemm(act, down, out, ids, down.shape[2], False, s2, down_scale, x, add=add, trigger=trigger_early(x.device))
    return out


def glu_decode(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor | None, a_scale: torch.Tensor | None,
               out_scale: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """A dense gate-up layer and its SiLU-and-mul in one kernel, for decode-sized x [T <= 16, H]: weight
    [2I, H] (gate rows first, K contiguous); FP8 (x already quantized with `a_scale`, per-tensor `w_scale`) or
    float. The output [T, I] is FP8 with `out_scale` when given, else in `ref`'s dtype (the model's). Llama 4's
    shared expert at decode (layers/moe.py): one launch instead of cuBLAS's GEMM and the SiLU kernel."""
    t = x.shape[0]
    inter = weight.shape[0] // 2
    assert 0 < t <= DECODE_MAX_PAIRS
    act = torch.empty((t, inter), dtype=torch.float8_e4m3fn if out_scale is not None else ref.dtype, device=x.device)
    _gemm(x, weight.t().unsqueeze(0), act, None, inter, True, a_scale, w_scale, ref, out_scale=out_scale)
    return act
