"""Triton FP8 W8A8 matmul for a few rows (decode at small batch): y = (x * sx) @ (W * sw)^T, x [M <= 16, K] and
W [N, K] float8_e4m3fn with per-tensor scales, y in bf16/fp16/fp32.

At M <= 16 a linear layer is a weight stream: each program owns BLOCK_N output features and walks K in
BLOCK_K slices (fp8 tensor-core dots with fp32 accumulation, rows padded to 16), so the grid has N / BLOCK_N
programs each reading a contiguous band of W. Measured on an H200 inside CUDA graphs (8B layer shapes, batch 1):
at best 3.19 TB/s (16 features x 256-wide K slices, 2 warps, 6 stages) against cuBLAS's 3.54, so it is off by
default (LLAMASERVE_FP8_SMALL_M=triton turns it on); it is kept, tested, as the place to tune a faster weight
stream (TMA loads, split-K for the narrow layers). Reference: layers/quantization.py's `reference_fp8_linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_gemv_kernel(X, W, Y, Bias, SX, SW, M, N, K, stride_x, stride_w, stride_y,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_ptrs = X + rows[:, None] * stride_x + kk[None, :]
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_w + kk[None, :]
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    y = acc * (tl.load(SX) * tl.load(SW))
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fp8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, block_n: int = 16, block_k: int = 256,
             num_warps: int = 2, num_stages: int = 6) -> torch.Tensor:
    """xq [M <= 16, K] fp8, w [N, K] fp8 (row-major), scalar float32 scales -> [M, N] in out_dtype."""
    m, k = xq.shape
    n = w.shape[0]
    if m > 16:
        raise ValueError(f"fp8_gemv takes at most 16 rows, got {m}")
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    assert xq.stride(1) == 1 and w.stride(1) == 1
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        xq, w, y, bias if bias is not None else y, x_scale, w_scale, m, n, k, xq.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages)
    return y
