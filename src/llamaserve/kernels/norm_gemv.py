"""A one-token layer input: the residual add, RMSNorm, FP8 quantize and the FP8 qkv GEMV in one kernel.

At batch 1 a Llama 4 layer starts with the input RMSNorm (kernels/norm_act.py: x + residual, normalized, written
as FP8 with qkv's static input scale), then qkv's GEMV (kernels/gemv.py, float16 products). The norm is one
program that waits for the previous layer's last GEMV, reads a 10 KB row and writes 5 KB: ~2 us in which no
weight streams (Scout, H200: the norm ends 1.9 us after the down GEMV before it). Here every GEMV program
normalizes the row itself: it reads x (+ x2) + residual slice by slice from L2 once for the sum of squares
(program 0 also writes x + residual, the layer's next residual, to a new buffer), then again per slice (L1 / L2)
to form the FP8 input slice (the norm kernel's arithmetic: float32 statistics, rounded to the model dtype before
the weight, then value / scale rounded to e4m3) that its float16 row dot takes, as kernels/gemv.py's
`fp8_rows_dot`. `PRE` weight slices are loaded before the row's statistics, so the weight stream starts as the
kernel does.

The sum of squares runs in another order than the norm kernel's (per slice, then one reduction), so the FP8
input can differ from the unfused path's by one e4m3 step where a value sits on a rounding boundary. Reference:
`norm_gemv_torch` (layers/norm.py's RMSNorm reference, `quantize_fp8`, then `gemv_torch`).
LLAMASERVE_NORM_QKV_GEMV (`norm_qkv_mode`) switches it on for Llama 4's qkv (models/llama4.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llamaserve.kernels.gemv import HALF_MAX_SLICES
from llamaserve.kernels.norm_act import round_e4m3
from llamaserve.kernels.pdl import gdc_launch_dependents, gdc_wait, gemv_pdl

NORM_QKV_MODES = ("0", "1", "trigger")


@triton.jit
def _row_slice(X, X2, R, offs, ok, HAS_X2: tl.constexpr):
    """x (+ x2, rounded to x's dtype) + residual at `offs`, as kernels/norm_act.py's `_rms_norm_kernel` sums them."""
    x = tl.load(X + offs, mask=ok, other=0.0)
    if HAS_X2:
        x = (x.to(tl.float32) + tl.load(X2 + offs, mask=ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return x + tl.load(R + offs, mask=ok, other=0.0)


@triton.jit
def _norm_gemv_kernel(X, X2, R, RNew, NW, S, W, Y, SW, N, eps, stride_w, K: tl.constexpr, HAS_X2: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE: tl.constexpr, TRIGGER: tl.constexpr,
                      PDL: tl.constexpr = False):
    if TRIGGER:
        gdc_launch_dependents()
    s = tl.load(S)  # the static input scale: no earlier kernel writes it
    if PDL:
        gdc_wait()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_w + kk[None, :]
    w0, w1 = None, None
    if PRE >= 1:  # the first weight slices in flight during the statistics
        w0 = tl.load(w_ptrs, mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
    if PRE >= 2:
        w1 = tl.load(w_ptrs + BLOCK_K, mask=row_ok[:, None] & (BLOCK_K + kk < K)[None, :], other=0.0)
    sq = tl.zeros([BLOCK_K], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        x = _row_slice(X, X2, R, k0 + kk, k_ok, HAS_X2)
        if tl.program_id(0) == 0:
            tl.store(RNew + k0 + kk, x, mask=k_ok)
        h = x.to(tl.float32)
        sq += h * h
    rinv = tl.math.rsqrt(tl.sum(sq, 0) / K + eps)
    tile = tl.zeros([BLOCK_N, BLOCK_K], tl.float16)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        if PRE >= 1 and k0 == 0:
            w = w0
        elif PRE >= 2 and k0 == BLOCK_K:
            w = w1
        else:
            w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = _row_slice(X, X2, R, k0 + kk, k_ok, HAS_X2)
        y = tl.load(NW + k0 + kk, mask=k_ok, other=0.0) * (x.to(tl.float32) * rinv).to(x.dtype)
        xq = round_e4m3(y.to(tl.float32) / s)  # the FP8 input value, exact in float16
        tile += w.to(tl.float16) * (xq.to(tl.float16) * 0.0009765625)[None, :]  # 2**-10, as fp8_rows_dot
    acc = tl.sum(tile.to(tl.float32), 1) * 1024.0
    acc = acc * (s * tl.load(SW))
    tl.store(Y + rows, acc.to(Y.dtype.element_ty), mask=row_ok)


def norm_qkv_mode() -> str:
    """LLAMASERVE_NORM_QKV_GEMV (an A/B switch, off by default): `1`, a one-token Llama 4 layer's input norm runs
    inside its qkv GEMV (`norm_gemv`) and the kernel before it (the routed down GEMV) does not trigger early (the
    GEMV's programs would wait on SMs); `trigger`, the same with the trigger kept; `0`, the norm kernel."""
    value = os.environ.get("LLAMASERVE_NORM_QKV_GEMV", "0")
    if value not in NORM_QKV_MODES:
        raise ValueError(f"LLAMASERVE_NORM_QKV_GEMV={value!r}: expected one of {', '.join(NORM_QKV_MODES)}")
    return value


def norm_qkv_pre() -> int:
    """LLAMASERVE_NORM_QKV_PRE (an A/B switch): weight slices `norm_gemv` loads before the row's statistics, 0-2
    (default 1)."""
    value = os.environ.get("LLAMASERVE_NORM_QKV_PRE", "1")
    if value not in ("0", "1", "2"):
        raise ValueError(f"LLAMASERVE_NORM_QKV_PRE={value!r}: expected 0, 1 or 2")
    return int(value)


def norm_gemv(x: torch.Tensor, add: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
              eps: float, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
              launch: tuple[int, int, int], pre: int = 1, trigger: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, add (or None), residual [1, K] in the model dtype; w [N, K] FP8 (K contiguous) with per-tensor
    `w_scale`, `x_scale` the static input scale. Returns (y [1, N] = quantize(RMSNorm(x + add + residual)) @ w^T
    times both scales, in `out_dtype`; x + add + residual, a new tensor). `launch`: (BLOCK_N, BLOCK_K, warps) as
    kernels/gemv.py's FP8_LAUNCH; `pre`: 0-2 weight slices loaded before the statistics; `trigger`: the kernel
    after it may launch early (kernels/pdl.py)."""
    k = x.shape[1]
    n = w.shape[0]
    block_n, block_k, warps = launch
    if x.shape[0] != 1 or residual.shape != x.shape or (add is not None and add.shape != x.shape) \
            or w.shape[1] != k or w.stride(1) != 1 or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"norm_gemv takes one row and an FP8 weight [N, K] with contiguous rows, got x "
                         f"{tuple(x.shape)}, residual {tuple(residual.shape)}, w {tuple(w.shape)} {w.dtype}")
    if k > HALF_MAX_SLICES * block_k or pre not in (0, 1, 2):
        raise ValueError(f"norm_gemv: BLOCK_K = {block_k} cuts K = {k} into more than {HALF_MAX_SLICES} slices, or "
                         f"pre = {pre} is not 0, 1 or 2")
    x, residual = x.contiguous(), residual.contiguous()
    add = add.contiguous() if add is not None else None
    y = torch.empty((1, n), dtype=out_dtype, device=x.device)
    new_residual = torch.empty_like(x)
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, add if add is not None else x, residual, new_residual, norm_weight, x_scale, w, y, w_scale, n, eps,
        w.stride(0), K=k, HAS_X2=add is not None, BLOCK_N=block_n, BLOCK_K=block_k, PRE=pre, TRIGGER=trigger,
        num_warps=warps, **gemv_pdl(x.device))
    return y, new_residual


def norm_gemv_torch(x: torch.Tensor, add: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: layers/norm.py's RMSNorm (torch backend) with the FP8 output, then kernels/gemv.py's
    `gemv_torch`."""
    from llamaserve.kernels.gemv import gemv_torch
    from llamaserve.layers.norm import RMSNorm

    norm = RMSNorm(x.shape[1], eps, x.dtype).to(x.device)
    norm.weight.data.copy_(norm_weight)
    xq, new_residual = norm(x, residual, out_scale=x_scale, add=add)
    return gemv_torch(xq, w, x_scale, w_scale, out_dtype), new_residual
