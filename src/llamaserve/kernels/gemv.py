"""Triton GEMV for the LM head at batch 1: y = x @ W^T for one row x [1, K] and a float weight W [N, K] (bf16 in
practice; fp16 / float32 work too), float32 sums, y [1, N] in W's dtype.

At batch 1 the LM head of Llama 4 (202,048 x 5,120 bf16, 2.07 GB) is the largest single read of a decode step.
cuBLAS's one-row GEMM streams it at 4.09 TB/s (506 us) on an H200 where a plain read-only stream reaches 4.55
(benchmarks/hbm_read_probe.py); this kernel is that stream with the dot product on top, 464.5 us (4.45 TB/s) on
the same GPU, -0.045 ms per Scout decode step. Each program owns BLOCK_N rows of W and walks K in BLOCK_K slices
(plain loads, products summed in float32; no tensor cores: one flop per byte), so the grid has N / BLOCK_N
programs, thousands, enough to keep HBM busy. At 2 and 4 rows it lost to cuBLAS (542 / 771 against 507 / 509 us),
so it takes one row only. Reference: `gemv_torch` (float32 matmul, cast to W's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K, NUM_WARPS = 64, 256, 4  # H200 sweep (docs/performance.md): 64-32-16 x 256 within 3 us


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_w + kk[None, :]
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(X + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], 1)
    tl.store(Y + rows, acc.to(Y.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
         num_warps: int = NUM_WARPS) -> torch.Tensor:
    """x [1, K] (any float dtype), w [N, K] with contiguous rows -> x @ w^T [1, N] in w's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if m != 1 or w.shape[1] != k or w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv takes one row and K-contiguous operands of one K, got x {tuple(x.shape)} "
                         f"(strides {x.stride()}) and w {tuple(w.shape)} (strides {w.stride()})")
    y = torch.empty((1, n), dtype=w.dtype, device=w.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=num_warps)
    return y


def gemv_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference: float32 products and sums, cast to w's dtype."""
    return (x.float() @ w.float().t()).to(w.dtype)
