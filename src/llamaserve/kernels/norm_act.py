"""Triton kernels for the elementwise parts of a Llama layer: fused residual-add + RMSNorm, and SiLU-and-mul.

`rms_norm(x, weight, eps, residual)` returns norm(x + residual) and writes x + residual into `residual` in place
(the layer's next residual), in one read of each input; the arithmetic follows transformers' LlamaRMSNorm
(fp32 statistics, cast to the input dtype before the weight). `silu_and_mul(x)` takes the fused
[T, 2 * I] gate-up output. Both take `out_scale` (a float32 device scalar): the output is then written as
float8_e4m3fn = value / out_scale saturated to +-448, ready for the next FP8 linear (no separate quantize pass).
References: layers/norm.py and layers/activation.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llamaserve.kernels.pdl import early_loads, gdc_wait, pdl_args


@triton.jit
def round_e4m3(y):
    """fp32 -> the nearest float8_e4m3fn value (ties to even, saturating at 448), still as fp32.

    The cast after it is then exact. NOTE: Triton's CPU interpreter rounds fp32 -> fp8 wrongly when the mantissa
    carries into the exponent and for subnormals (31.1 -> 16); rounding here first gives the GPU's result on both.
    """
    y = tl.clamp(y, -448.0, 448.0)
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # keep 3 mantissa bits, ties to even
    normal = bits.to(tl.float32, bitcast=True)
    sub = (y * 512.0 + 12582912.0) - 12582912.0  # subnormal step 2^-9; 1.5 * 2^23 rounds to an integer
    return tl.where(tl.abs(y) < 0.015625, sub / 512.0, normal)


@triton.jit
def _store_out(Y, offs, y, mask, S, HAS_SCALE: tl.constexpr, s=None):
    """y to Y (masked), as FP8 values y / S when HAS_SCALE (`s`: S already loaded, else loaded here)."""
    if HAS_SCALE:
        if s is None:
            s = tl.load(S)
        y = round_e4m3(y.to(tl.float32) / s)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def rms_normalize(x, W, cols, mask, N, eps, w=None):
    """W * (x / rms(x)) of one row as transformers' LlamaRMSNorm rounds it: float32 statistics, the normalized row
    cast to x's dtype before the weight (W[cols], masked). `w`: W[cols] already loaded (before a PDL wait, see
    kernels/pdl.py's `early_loads`); None: loaded here, after the statistics (behind the reduction's CTA barrier)."""
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
    if w is None:
        w = tl.load(W + cols, mask=mask, other=0.0)
    return w * h.to(x.dtype)


@triton.jit
def _rms_norm_kernel(X, X2, R, W, Y, S, Y8, S8, stride_x, stride_x2, stride_r, stride_y, stride_y8, N, eps,
                     HAS_X2: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr,
                     HAS_COPY: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                     EARLY: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w, s, s8 = None, None, None
    if EARLY:  # what no earlier kernel writes: the weight and the output scales (early_loads)
        w = tl.load(W + cols, mask=mask, other=0.0)
        if HAS_SCALE:
            s = tl.load(S)
        if HAS_COPY:
            s8 = tl.load(S8)
    if PDL:  # a programmatic dependent (kernels/pdl.py): the previous kernel's output is read after this
        gdc_wait()
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_X2:  # a second addend (the MoE's shared-expert output), summed in x's dtype first
        x2 = tl.load(X2 + row * stride_x2 + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + x2.to(tl.float32)).to(X.dtype.element_ty)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(R + row * stride_r + cols, x, mask=mask)
    y = rms_normalize(x, W, cols, mask, N, eps, w)
    _store_out(Y, row * stride_y + cols, y, mask, S, HAS_SCALE, s)
    if HAS_COPY:  # a second, FP8 copy of the output (scale S8) for another consumer
        _store_out(Y8, row * stride_y8 + cols, y, mask, S8, True, s8)


def norm_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel over `block` columns: 32 at 8,192 (Scout's 5,120), 8 at 4,096, else
    4, so each thread holds a few 16-byte pieces of the row. Batch-1 Scout decode on the H200 (decode_variants.py,
    one load each): 4 warps 5.88 ms per step, 8 warps 5.81; with moe_decode.norm_router, 8 warps 5.68 / 5.73,
    16 warps 5.65 / 5.71, 32 warps 5.68 (second load). LLAMASERVE_NORM_WARPS overrides it (an A/B switch)."""
    env = os.environ.get("LLAMASERVE_NORM_WARPS")
    return int(env) if env else (32 if block >= 8192 else 8 if block >= 4096 else 4)


def _out(x: torch.Tensor, shape: tuple[int, ...], out_scale: torch.Tensor | None) -> torch.Tensor:
    dtype = torch.float8_e4m3fn if out_scale is not None else x.dtype
    return torch.empty(shape, dtype=dtype, device=x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out_scale: torch.Tensor | None = None, fp8_copy: torch.Tensor | None = None,
             add: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, N]. With `residual` ([T, N], updated in place to x + residual), normalizes x + residual. With
    `fp8_copy` (a scale), also returns the output quantized to FP8 with it: (y, y_fp8). With `add` ([T, N]),
    x + add (rounded to x's dtype) takes x's place."""
    t, n = x.shape
    y = _out(x, (t, n), out_scale)
    y8 = _out(x, (t, n), fp8_copy) if fp8_copy is not None else y
    if t:
        r = residual if residual is not None else x
        s = out_scale if out_scale is not None else weight
        x2 = add if add is not None else x
        _rms_norm_kernel[(t,)](x, x2, r, weight, y, s, y8, fp8_copy if fp8_copy is not None else weight,
                               x.stride(0), x2.stride(0), r.stride(0), y.stride(0), y8.stride(0), n, eps,
                               HAS_X2=add is not None, HAS_RESIDUAL=residual is not None,
                               HAS_SCALE=out_scale is not None, HAS_COPY=fp8_copy is not None,
                               BLOCK=triton.next_power_of_2(n), num_warps=norm_warps(triton.next_power_of_2(n)),
                               EARLY=early_loads(), **pdl_args(x.device))
    return (y, y8) if fp8_copy is not None else y


@triton.jit
def _silu_mul_kernel(X, Y, S, stride_x, stride_y, N, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    _store_out(Y, row * stride_y + cols, s * u, mask, S, HAS_SCALE)


def silu_and_mul(x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, 2 * I] -> silu(x[:, :I]) * x[:, I:]."""
    t, two_n = x.shape
    n = two_n // 2
    y = _out(x, (t, n), out_scale)
    if t == 0:
        return y
    block = min(1024, triton.next_power_of_2(n))
    s = out_scale if out_scale is not None else x
    _silu_mul_kernel[(t, triton.cdiv(n, block))](x, y, s, x.stride(0), y.stride(0), n,
                                                 HAS_SCALE=out_scale is not None, BLOCK=block)
    return y
