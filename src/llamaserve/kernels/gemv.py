"""Triton GEMV for one-row steps (batch-1 decode): y = x @ W^T for x [1, K] and W [N, K], float32 sums, y [1, N].
Two uses, both measured on Scout at batch 1 on H200 (docs/performance.md):

- the LM head (bf16 W, 202,048 x 5,120, 2.07 GB): cuBLAS's one-row GEMM streams it at 4.09-4.32 TB/s where a plain
  read-only stream reaches 4.56-4.66 (benchmarks/hbm_read_probe.py); this kernel at 4.45-4.58 TB/s (452-465 against
  479-506 us), -0.01 to -0.045 ms per step. At 2 and 4 rows a 4-row form lost to cuBLAS (542 / 771 against
  507 / 509 us), so it takes one row only. On Llama-3.1-8B (1.05 GB head) it is neutral in the step (3.005 /
  2.992 against 2.992 / 3.020 ms off, one load, 2026-12-01).
- FP8 W8A8 linears (FP8 W and x with per-tensor scales): Llama 4's qkv, o and shared-expert down at one token
  (26-42 MB each). Alone they are no faster than cuBLAS (11.74 / 9.58 / 13.38 against 11.52 / 9.73 / 13.72 us,
  benchmarks/gemv_bench.py), yet the step is 0.06 ms faster with them (5.298 against 5.356 ms by `bench latency`,
  one lease). Why is not measured; a guess: among the graph's other kernels (PDL launches, the routed expert's
  GEMMs on the other stream) many small programs start and share SMs better than cuBLAS's few large ones.
  Their FP8 form (`half=True`, the default for them since 2026-12-01) multiplies in float16: alone 11.06-11.86 /
  8.67-8.98 / 12.72-12.84 us against 11.70 / 9.55-10.11 / 13.83-14.23 in float32 (a plain read of the same bytes:
  9.86 / 7.89 / 11.31 us), and the step 0.03-0.06 ms faster (5.250 / 5.252 against 5.303 / 5.307 ms, one load).
  In the step they launch as PDL dependents (`kernels/pdl.py` `gemv_pdl`) and let the PDL kernel after them
  (split attention, norm + router) launch early (`trigger`): 0.12-0.13 ms and 0.02 ms; launch 8x512x4.

Each program owns BLOCK_N rows of W and walks K in BLOCK_K slices (plain loads, products summed in float32, or
in float16 tiles for FP8; no tensor cores: one flop per byte), so the grid has N / BLOCK_N programs, hundreds to
thousands. Reference: `gemv_torch` (float32 matmul, times the scales, cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamaserve.kernels.pdl import gdc_launch_dependents, gdc_wait, gemv_pdl

BLOCK_N, BLOCK_K, NUM_WARPS = 64, 256, 4  # bf16 LM head, H200 sweep: 64-32-16 x 256 within 3 us
FP8_LAUNCH = (8, 512, 4)  # FP8 linears: (BLOCK_N, BLOCK_K, warps), H200 sweeps in Scout's step (docs/performance.md)
LAUNCH_FIELDS = "BLOCK_NxBLOCK_KxWARPS"  # how LLAMASERVE_LM_HEAD_GEMV / LLAMASERVE_FP8_GEMV spell a launch
HALF_MAX_SLICES = 300  # `fp8_rows_dot`: K / BLOCK_K products per float16 lane at most (196 each, under 65,504)


def half_fits(k: int, block_k: int) -> bool:
    """Whether `fp8_rows_dot`'s float16 lanes can sum K in BLOCK_K-wide slices (at most HALF_MAX_SLICES of them)."""
    return k <= HALF_MAX_SLICES * block_k


@triton.jit
def fp8_rows_dot(w_ptrs, X, row_ok, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rows] @ x for a program's BLOCK_N FP8 rows (`w_ptrs`: their first BLOCK_K-wide slice, K contiguous) and
    FP8 x, float32 [BLOCK_N], unscaled. Each slice's products in float16 summed elementwise into a float16 tile,
    reduced in float32 once at the end: FP8 -> float16 is one packed convert per two values where float32 takes
    more, and no cross-warp reduction sits between slices. Every product of two FP8 values is exact in float16
    (4-bit significands); x is scaled by 2**-10 (exact) so that a lane's sum of K / BLOCK_K products stays below
    float16's 65,504 while K / BLOCK_K <= 300 (448 * 448 * 2**-10 = 196 per product); the sums round to float16's
    11 bits, below a bf16 output's 8. K is a constexpr: the slice loop is unrolled. The loop stays written out
    here: the same loop through two small jit helpers (x slice, weight slice) ran Scout's step 0.13-0.14 ms slower
    on two H200 leases, though the PTX compiled on the CPU for sm_90 matched (docs/performance.md)."""
    kk = tl.arange(0, BLOCK_K)
    tile = tl.zeros([BLOCK_N, BLOCK_K], tl.float16)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float16)
        x = tl.load(X + k0 + kk, mask=k_ok, other=0.0).to(tl.float16) * 0.0009765625  # 2**-10
        tile += w * x[None, :]
    return tl.sum(tile.to(tl.float32), 1) * 1024.0


@triton.jit
def _gemv_kernel(X, W, Y, SX, SW, N, K, stride_w, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, HALF: tl.constexpr = False, KC: tl.constexpr = 0,
                 TRIGGER: tl.constexpr = False, PDL: tl.constexpr = False):
    """HALF (FP8 x and W; K given again as the constexpr KC): `fp8_rows_dot`'s float16 products. TRIGGER: let the
    next kernel, a PDL launch, start early (kernels/pdl.py `trigger_early`). PDL: launched as a programmatic
    dependent (kernels/pdl.py `gemv_pdl`), wait for the kernel before first."""
    if TRIGGER:
        gdc_launch_dependents()
    if PDL:
        gdc_wait()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_w + kk[None, :]
    if HALF:
        acc = fp8_rows_dot(w_ptrs, X, row_ok, KC, BLOCK_N, BLOCK_K)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + kk) < K
            w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(X + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], 1)
    if HAS_SCALE:  # FP8 operands: per-tensor scales
        acc = acc * (tl.load(SX) * tl.load(SW))
    tl.store(Y + rows, acc.to(Y.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
         num_warps: int = NUM_WARPS, x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, half: bool = False, trigger: bool = False) -> torch.Tensor:
    """x [1, K] (any float dtype), w [N, K] with contiguous rows -> x @ w^T [1, N] in `out_dtype` (default w's).
    FP8 operands pass their per-tensor scales (scalar float32 tensors): y = (x @ w^T) * x_scale * w_scale.
    `half`: FP8 x and w only, float16 products (the kernel's HALF; compiled once per K). `trigger`: call
    `gdc_launch_dependents` first (only where kernels/pdl.py `trigger_early` holds: the FP8 linears pass
    `gemv_trigger`)."""
    m, k = x.shape
    n = w.shape[0]
    if m != 1 or w.shape[1] != k or w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv takes one row and K-contiguous operands of one K, got x {tuple(x.shape)} "
                         f"(strides {x.stride()}) and w {tuple(w.shape)} (strides {w.stride()})")
    if (x_scale is None) != (w_scale is None):
        raise ValueError("gemv: give both x_scale and w_scale, or neither")
    if half and not (x.dtype == w.dtype == torch.float8_e4m3fn and half_fits(k, block_k)):
        raise ValueError(f"gemv: half=True takes FP8 x and w with K <= {HALF_MAX_SLICES} * block_k, got {x.dtype} "
                         f"and {w.dtype}, K = {k}, block_k = {block_k} (for the FP8 linears LLAMASERVE_FP8_GEMV sets "
                         f"block_k, LLAMASERVE_FP8_GEMV_HALF=0 sums in float32 instead)")
    y = torch.empty((1, n), dtype=out_dtype or w.dtype, device=w.device)
    scaled = x_scale is not None
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, x_scale if scaled else y, w_scale if scaled else y, n, k,
                                             w.stride(0), HAS_SCALE=scaled, BLOCK_N=block_n, BLOCK_K=block_k,
                                             HALF=half, KC=k if half else 0, TRIGGER=trigger,
                                             num_warps=num_warps, **(gemv_pdl(w.device) if half else {}))
    return y


def gemv_torch(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None = None,
               w_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference: float32 products and sums (times the scales), cast to `out_dtype` (default w's)."""
    y = x.float() @ w.float().t()
    if x_scale is not None:
        y = y * (x_scale.float() * w_scale.float())
    return y.to(out_dtype or w.dtype)
