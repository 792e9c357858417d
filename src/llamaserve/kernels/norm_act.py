"""Triton kernels for the elementwise parts of a Llama layer: fused residual-add + RMSNorm, and SiLU-and-mul.

`rms_norm(x, weight, eps, residual)` returns norm(x + residual) and writes x + residual into `residual` in place
(the layer's next residual), in one read of each input; the arithmetic follows transformers' LlamaRMSNorm
(fp32 statistics, cast to the input dtype before the weight). `silu_and_mul(x)` takes the fused
[T, 2 * I] gate-up output. References: layers/norm.py and layers/activation.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, Y, stride_x, stride_r, stride_y, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(R + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, 0) / N
    h = h * tl.math.rsqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = w * h.to(x.dtype)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """x: [T, N]. With `residual` ([T, N], updated in place to x + residual), normalizes x + residual."""
    t, n = x.shape
    y = torch.empty_like(x)
    if t == 0:
        return y
    r = residual if residual is not None else x
    _rms_norm_kernel[(t,)](x, r, weight, y, x.stride(0), r.stride(0), y.stride(0), n, eps,
                           HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return y


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(Y + row * stride_y + cols, (s * u).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] -> silu(x[:, :I]) * x[:, I:]."""
    t, two_n = x.shape
    n = two_n // 2
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](x, y, x.stride(0), y.stride(0), n, BLOCK=block)
    return y
