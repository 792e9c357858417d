"""Triton weight-only NVFP4 GEMMs: y = x @ dequant(W)^T for linear layers, and the grouped variant for MoE experts.

W is ModelOpt NVFP4 (layers/nvfp4.py): packed e2m1 codes uint8 [N, K / 2] (low nibble = even k), e4m3 block
scales [N, K / 16] and a float32 global scale per output row [N]. x is bf16, fp16 or fp32 [M, K] and stays in its
dtype (weight-only: Hopper has no FP4 tensor cores). Each program loads a [BLOCK_N, BLOCK_K / 2] tile of bytes,
decodes the low and high nibbles in registers (an e2m1 code shifted into an fp16 bit pattern, times 2^14, is its
value; an e4m3 byte shifted the same way, times 2^8, is its value: exact and independent of fp8 support in the
Triton build or the interpreter), interleaves them back into k order with tl.join + reshape, multiplies each run
of 16 by its block scale (exact: the product has at most 6 significant bits) and feeds tl.dot in x's dtype with
an fp32 accumulator. The global row scale multiplies the accumulator in the epilogue.

Tiles (`gemm_tiles`, from a sweep on an H100): decode (M <= 16) uses 16 x 32 x 128 tiles, M up to 1024 128 x 64,
larger M 128 x 128. Measured on an H100 (bf16 x, Llama-3.1-8B projections, benchmarks/nvfp4_gemm_bench.py):
270-680 GB/s of packed weight at M = 1 (0.03-0.10 ms; cuBLAS bf16 streams 3.6x the bytes in 0.7-0.95x the time),
about 240 TFLOP/s at M = 4096 (cuBLAS bf16: ~750); Scout's 16 experts at T = 1: 0.35 ms (bf16 grouped: 0.51).
Decode wants a split-K / GEMV-style kernel next; large M is bound by the in-register dequantization.
The grouped kernel mirrors kernels/fused_moe.py: tokens sorted by expert
with `align_by_expert`, each BLOCK_M block of sorted pairs belongs to one expert (or is padding, -1), A rows are
read through the pairs (the token itself for gate-up, A_PER_TOKEN, multiplied by its router score, MUL_SCORE;
the pair's activation for down). References: layers/nvfp4.py `nvfp4_linear_torch`, layers/moe_nvfp4.py
`nvfp4_experts_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamaserve.kernels.fused_moe import align_by_expert, block_rows
from llamaserve.kernels.norm_act import silu_and_mul


@triton.jit
def _e2m1_value(code):
    """uint8 e2m1 codes (0-15) -> float32 values."""
    bits = ((code & 0x8).to(tl.uint16) << 12) | ((code & 0x7).to(tl.uint16) << 9)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _e4m3_value(byte):
    """uint8 float8_e4m3fn bit patterns -> float32 values (finite ones; scales are never NaN)."""
    bits = ((byte & 0x80).to(tl.uint16) << 8) | ((byte & 0x7F).to(tl.uint16) << 7)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _weight_tile(w_ptrs, s_ptrs, kb, ks, n_ok, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized (without the global scale) W tile [BLOCK_N, BLOCK_K], float32; kb / ks are the byte and
    block-scale column indices of this K step."""
    packed = tl.load(w_ptrs, mask=n_ok[:, None] & (kb < K // 2)[None, :], other=0)
    w = tl.reshape(tl.join(_e2m1_value(packed & 0xF), _e2m1_value(packed >> 4)), [BLOCK_N, BLOCK_K])
    scale = _e4m3_value(tl.load(s_ptrs, mask=n_ok[:, None] & (ks < K // 16)[None, :], other=0))
    w = tl.reshape(w, [BLOCK_N, BLOCK_K // 16, 16]) * scale[:, :, None]
    return tl.reshape(w, [BLOCK_N, BLOCK_K])


@triton.jit
def _nvfp4_gemm_kernel(X, W, S, G, Bias, Y, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                       HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rows < M, cols < N
    kk = tl.arange(0, BLOCK_K)
    kb = tl.arange(0, BLOCK_K // 2)
    ks = tl.arange(0, BLOCK_K // 16)
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + kk[None, :]
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_wn + kb[None, :]
    s_ptrs = S + cols[:, None].to(tl.int64) * stride_sn + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
        w = _weight_tile(w_ptrs + k0 // 2, s_ptrs + k0 // 16, k0 // 2 + kb, k0 // 16 + ks, n_ok, K, BLOCK_N,
                         BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PREC)
    acc = acc * tl.load(G + cols, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_k(k: int, want: int) -> int:
    return max(32, min(want, triton.next_power_of_2(k)))


def gemm_tiles(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an M x N x K problem."""
    def bn(want: int) -> int:
        return min(want, max(16, triton.next_power_of_2(n)))

    # measured on an H100 over Llama-3.1-8B's four projection shapes (benchmarks/nvfp4_gemm_bench.py)
    if m <= 16:
        return 16, bn(32), _block_k(k, 128), 4, 4
    if m <= 64:
        return 64, bn(64), _block_k(k, 64), 4, 3
    if m <= 1024:
        return 128, bn(64), _block_k(k, 64), 8, 3
    return 128, bn(128), _block_k(k, 64), 8, 4


def nvfp4_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_scale_2: torch.Tensor,
               bias: torch.Tensor | None = None, tiles: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ W^T with W packed [N, K / 2] uint8, w_scale [N, K / 16] float8_e4m3fn and
    w_scale_2 the float32 global scale per row [N] (or a scalar) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] * 2 != k or w_scale.shape != (n, k // 16):
        raise ValueError(f"nvfp4_gemm: x {tuple(x.shape)} does not fit W {tuple(w.shape)} / scales "
                         f"{tuple(w_scale.shape)}")
    x = x.contiguous()
    g = w_scale_2.float().expand(n).contiguous() if w_scale_2.dim() == 0 else w_scale_2.float().contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = tiles or gemm_tiles(m, n, k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    s8 = w_scale.contiguous().view(torch.uint8)
    _nvfp4_gemm_kernel[grid](x, w, s8, g, bias if bias is not None else g, y, m, n, k, x.stride(0), w.stride(0),
                             s8.stride(0), y.stride(0), HAS_BIAS=bias is not None, PREC=_prec(x.dtype),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                             num_stages=stages)
    return y


@triton.jit
def _nvfp4_moe_kernel(A, W, S, G, Out, SortedPairs, BlockExpert, Scores, num_pairs, N, K, TOP_K: tl.constexpr,
                      stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_om,
                      A_PER_TOKEN: tl.constexpr, MUL_SCORE: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e, pairs, row_ok, a_rows, cols, n_ok = block_rows(BlockExpert, SortedPairs, num_pairs, N, TOP_K, A_PER_TOKEN,
                                                      BLOCK_M, BLOCK_N)
    if e < 0:
        return
    kk = tl.arange(0, BLOCK_K)
    kb = tl.arange(0, BLOCK_K // 2)
    ks = tl.arange(0, BLOCK_K // 16)
    e64 = e.to(tl.int64)
    a_ptrs = A + a_rows[:, None].to(tl.int64) * stride_am + kk[None, :]
    w_ptrs = W + e64 * stride_we + cols[:, None].to(tl.int64) * stride_wn + kb[None, :]
    s_ptrs = S + e64 * stride_se + cols[:, None].to(tl.int64) * stride_sn + ks[None, :]
    if MUL_SCORE:
        score = tl.load(Scores + pairs, mask=row_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
        if MUL_SCORE:
            a = (a.to(tl.float32) * score[:, None]).to(A.dtype.element_ty)
        w = _weight_tile(w_ptrs + k0 // 2, s_ptrs + k0 // 16, k0 // 2 + kb, k0 // 16 + ks, n_ok, K, BLOCK_N,
                         BLOCK_K)
        acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision=PREC)
    acc = acc * tl.load(G + e64 * stride_ge + cols, mask=n_ok, other=0.0)[None, :]
    o_ptrs = Out + pairs[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _moe_gemm(a: torch.Tensor, w: torch.Tensor, s: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
              sorted_pairs: torch.Tensor, block_expert: torch.Tensor, scores: torch.Tensor, top_k: int,
              a_per_token: bool, mul_score: bool, block_m: int) -> None:
    _, n, half_k = w.shape
    k = half_k * 2
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = _block_k(k, 128 if block_m <= 16 else 64)
    s8 = s.view(torch.uint8)
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _nvfp4_moe_kernel[grid](a, w, s8, g, out, sorted_pairs, block_expert, scores, out.shape[0], n, k, top_k,
                            a.stride(0), w.stride(0), w.stride(1), s8.stride(0), s8.stride(1), g.stride(0),
                            out.stride(0), A_PER_TOKEN=a_per_token, MUL_SCORE=mul_score, PREC=_prec(a.dtype),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def nvfp4_fused_moe(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                    gate_up_scale_2: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                    down_scale_2: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                    block_m: int | None = None) -> torch.Tensor:
    """sum over k of expert_{top_ids}(x * top_scores) with NVFP4 experts: x [T, H]; gate_up packed [E, 2I, H / 2]
    with scales [E, 2I, H / 16] and per-row global scales [E, 2I]; down packed [E, H, I / 2], [E, H, I / 16],
    [E, H]. Expert e computes down_e(silu(gate_e(x)) * up_e(x)) (gate = the first I rows). -> [T, H], x's dtype."""
    t, h = x.shape
    top_k = top_ids.shape[1]
    num_experts, two_i, _ = gate_up.shape
    num_pairs = t * top_k
    block_m = block_m or (16 if num_pairs <= 64 * num_experts else 64)
    sorted_pairs, block_expert = align_by_expert(top_ids, num_experts, block_m)
    scores = top_scores.reshape(-1).float().contiguous()
    x = x.contiguous()
    inter = torch.empty((num_pairs, two_i), dtype=x.dtype, device=x.device)
    _moe_gemm(x, gate_up, gate_up_scale, gate_up_scale_2, inter, sorted_pairs, block_expert, scores, top_k, True,
              True, block_m)
    act = silu_and_mul(inter)  # [pairs, I]
    out = torch.empty((num_pairs, h), dtype=x.dtype, device=x.device)
    _moe_gemm(act, down, down_scale, down_scale_2, out, sorted_pairs, block_expert, scores, top_k, False, False,
              block_m)
    return out.view(t, top_k, h).sum(dim=1) if top_k > 1 else out
