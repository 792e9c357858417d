"""Triton fused MoE: tokens grouped by expert, one grouped GEMM for gate-up and one for down (bf16 or FP8 W8A8).

Routing (`align_by_expert`, torch ops on the device, no host sync, static shapes for CUDA graphs): the T * k
(token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M, so every
BLOCK_M-row block belongs to one expert; `block_expert[b]` is that expert, or -1 for the unused tail of the
worst-case block count. The GEMM kernel loads a block's rows of A through `sorted_pairs` (pair = token * k + j;
padding rows point past the end and are masked), multiplies them by the pair's router score when asked (Llama 4
scales the token before the expert), and computes A @ W[e] with W stored as the checkpoints store it:
gate_up [E, H, 2I] and down [E, I, H]. FP8: A is quantized per tensor before the kernel, W is float8_e4m3fn with
one scale per expert; the product is rescaled in the epilogue. Reference: layers/moe.py `fused_experts_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamaserve.kernels.norm_act import silu_and_mul


def align_by_expert(top_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [num_blocks * block_m], block_expert [num_blocks]) for top_ids [T, k]."""
    flat = top_ids.reshape(-1)
    n = flat.numel()
    num_blocks = triton.cdiv(n, block_m) + num_experts  # worst case: every expert's run ends in a partial block
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # not bincount: its output size depends on the data (a host sync)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # where each expert's run begins in the padded order
    first = torch.cumsum(counts, 0) - counts  # where each expert's pairs begin in `order`
    sorted_e = flat[order]
    rank = torch.arange(n, device=flat.device) - first[sorted_e]
    sorted_pairs = torch.full((num_blocks * block_m,), n, dtype=torch.int64, device=flat.device)
    sorted_pairs[starts[sorted_e] + rank] = order
    block_of_expert_end = torch.cumsum(padded // block_m, 0)  # blocks used up to and including each expert
    blocks = torch.arange(num_blocks, device=flat.device)
    block_expert = torch.searchsorted(block_of_expert_end, blocks, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs, block_expert


@triton.jit
def _moe_gemm_kernel(A, W, Out, SortedPairs, BlockExpert, Scores, AScale, WScale,
                     num_pairs, N, K, TOP_K: tl.constexpr, stride_am, stride_we, stride_wk, stride_wn, stride_om,
                     A_PER_TOKEN: tl.constexpr, MUL_SCORE: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m)
    if e < 0:
        return
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = pairs // TOP_K if A_PER_TOKEN else pairs  # gate-up reads tokens, down reads pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    a_ptrs = A + a_rows[:, None].to(tl.int64) * stride_am + kk[None, :]
    w_ptrs = W + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + cols[None, :] * stride_wn
    if MUL_SCORE:
        score = tl.load(Scores + pairs, mask=row_ok, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if MUL_SCORE:
            a = (a.to(tl.float32) * score[:, None]).to(w.dtype)
        acc += tl.dot(a, w, input_precision=PREC)
    if FP8:
        acc = acc * (tl.load(AScale) * tl.load(WScale + e))
    o_ptrs = Out + pairs[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor,
          block_expert: torch.Tensor, scores: torch.Tensor, top_k: int, a_per_token: bool, mul_score: bool,
          a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, block_m: int,
          config: dict | None = None) -> None:
    num_pairs = out.shape[0]
    _, k, n = w.shape
    block_n = 64 if n >= 64 else triton.next_power_of_2(n)
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    launch = {"BLOCK_N": block_n, "BLOCK_K": block_k}
    if config is not None:
        launch = {key: v for key, v in config.items() if key != "BLOCK_M"}
    fp8 = w.dtype == torch.float8_e4m3fn
    grid = (block_expert.numel(), triton.cdiv(n, launch["BLOCK_N"]))
    _moe_gemm_kernel[grid](
        a, w, out, sorted_pairs, block_expert, scores, a_scale if fp8 else scores, w_scale if fp8 else scores,
        num_pairs, n, k, top_k, a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        A_PER_TOKEN=a_per_token, MUL_SCORE=mul_score, FP8=fp8, PREC="ieee" if w.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, **launch)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor,
              top_scores: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
              a2_scale: torch.Tensor | None = None, block_m: int = 16) -> torch.Tensor:
    """sum over k of expert_{top_ids}(x * top_scores): x [T, H]; gate_up [E, H, 2I]; down [E, I, H].
    FP8 weights take per-expert scales (gate_up_scale, down_scale [E]) and per-tensor activation scales a1 / a2
    (None: dynamic)."""
    from llamaserve.layers.quantization import dynamic_scale, quantize_fp8

    t, h = x.shape
    top_k = top_ids.shape[1]
    num_experts, _, two_i = gate_up.shape
    num_pairs = t * top_k
    sorted_pairs, block_expert = align_by_expert(top_ids, num_experts, block_m)
    scores = top_scores.reshape(-1).float().contiguous()
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    inter = torch.empty((num_pairs, two_i), dtype=x.dtype, device=x.device)
    if fp8:  # the router score scales the token before quantization, as the bf16 path scales it in the kernel
        rows = (x.repeat_interleave(top_k, dim=0) * top_scores.reshape(-1, 1).to(x.dtype))
        s1 = a1_scale if a1_scale is not None else dynamic_scale(rows)
        _gemm(quantize_fp8(rows, s1), gate_up, inter, sorted_pairs, block_expert, scores, top_k, False, False, s1,
              gate_up_scale, block_m)
    else:
        _gemm(x, gate_up, inter, sorted_pairs, block_expert, scores, top_k, True, True, None, None, block_m)
    act = silu_and_mul(inter)  # [pairs, I]
    out = torch.empty((num_pairs, h), dtype=x.dtype, device=x.device)
    if fp8:
        s2 = a2_scale if a2_scale is not None else dynamic_scale(act)
        _gemm(quantize_fp8(act, s2), down, out, sorted_pairs, block_expert, scores, top_k, False, False, s2,
              down_scale, block_m)
    else:
        _gemm(act, down, out, sorted_pairs, block_expert, scores, top_k, False, False, None, None, block_m)
    return out.view(t, top_k, h).sum(dim=1) if top_k > 1 else out
