"""Triton fused MoE: tokens grouped by expert, one grouped GEMM for gate-up and one for down (bf16 or FP8 W8A8).

Routing: `align_by_expert` sorts the T * k (token, expert) pairs by expert and pads each expert's run to a multiple
of BLOCK_M, so every BLOCK_M-row block belongs to one expert; `block_expert[b]` is that expert, or -1 for the
unused tail of the worst-case block count (static shapes, no host sync: CUDA-graph safe). Up to `ALIGN_MAX_PAIRS`
pairs this is one single-program kernel (`_align_kernel`, which for top-1 routing also takes the router logits and
does the argmax and the sigmoid score); beyond it, torch ops on the device (`align_by_expert_torch`).

GEMMs (`_moe_gemm_kernel`): a block's rows of A are gathered through `sorted_pairs` (pair = token * k + j; padding
rows point past the end and are masked); gate-up reads the token's hidden state multiplied by the pair's router
score (Llama 4 scales the token before the expert) and, for FP8 weights, quantizes it in the kernel with the
per-tensor activation scale when the batch is tiny (at most `PREQUANT_MIN_PAIRS` pairs: no separate launch);
for larger batches `_quant_pairs_kernel` writes the score-scaled FP8 rows [P, H] once first, since in-kernel
quantization is redone by every N-tile program (at 256 pairs it made the gate-up GEMM ALU-bound: 96 of 106 ms
per Scout decode step on the H200 were the MoE GEMMs); W is read through strides, so both the checkpoints'
[E, K, N] layout and the [E, N, K] layout FP8 tensor cores prefer work (layers/moe.py stores the latter).
Few tokens leave most of the GPU idle (one expert's weights, a long serial K loop), so small batches split K
over `split_k` programs that write float32 partials; the SiLU-and-mul kernel and the final reduction sum them.
The down GEMM adds the shared expert's output in its epilogue (top-1, no split), else `_reduce_kernel` sums the
split partials and the k experts of a token and adds it. Launch parameters: `_launch` (an H200 sweep on Scout
shapes, benchmarks/moe_bench.py); LLAMASERVE_FUSED_MOE_GATE_UP / _DOWN override them (`launch_override`: at
batch 128 in Scout's step no other launch was 1.5% faster, docs/performance.md). Reference: layers/moe.py
`fused_experts_torch` / `fused_experts_fp8_torch`.
Top-1 steps of at most `moe_decode.DECODE_MAX_PAIRS` tokens (decode at small batch) go to kernels/moe_decode.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from llamaserve.kernels import launch_from_env, moe_decode
from llamaserve.kernels.norm_act import round_e4m3, silu_and_mul

ALIGN_MAX_PAIRS = 4096  # above this the torch alignment runs (prefill-sized steps, outside CUDA graphs)
PREQUANT_MIN_PAIRS = 17  # from this many pairs on, FP8 gate-up inputs are quantized once before the GEMM
SMEM_BYTES = 200 * 1024  # shared memory a launch may plan on (the H100/H200 limit is 227 KB per block)


def align_by_expert_torch(top_ids: torch.Tensor, num_experts: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [num_blocks * block_m], block_expert [num_blocks]) for top_ids [T, k], in torch ops."""
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
def top1_rows(Logits, rows, ok, stride_l, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """Top-1 routing of the rows `rows` (mask `ok`) of Logits [T, E]: each row's first largest logit, and its
    score sigmoid(logit) rounded to the logits' dtype (as float32)."""
    ee = tl.arange(0, BLOCK_E)
    lg = tl.load(Logits + rows[:, None] * stride_l + ee[None, :], mask=ok[:, None] & (ee[None, :] < E),
                 other=float("-inf")).to(tl.float32)
    best = tl.max(lg, axis=1)
    ids = tl.min(tl.where(lg == best[:, None], ee[None, :], BLOCK_E), axis=1)
    return ids, tl.sigmoid(best).to(Logits.dtype.element_ty).to(tl.float32)


@triton.jit
def _align_kernel(Ids, Logits, Scores, SortedPairs, BlockExpert, n, num_blocks, stride_l,
                  E: tl.constexpr, FROM_LOGITS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    p = tl.arange(0, BLOCK_P)
    ok = p < n
    if FROM_LOGITS:  # top-1 routing: the first largest logit, score = sigmoid(logit) rounded to the logits' dtype
        ids, score = top1_rows(Logits, p, ok, stride_l, E, BLOCK_E)
        tl.store(Scores + p, score, mask=ok)
        tl.store(Ids + p, ids.to(Ids.dtype.element_ty), mask=ok)
        ids = tl.where(ok, ids, -1)
    else:
        ids = tl.load(Ids + p, mask=ok, other=-1).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    bb = tl.arange(0, BLOCK_B)
    start = tl.program_id(0) * 0  # rows used so far (a scalar tensor, carried through the loop)
    for e in range(E):
        hit = (ids == e).to(tl.int32)
        cnt = tl.sum(hit, axis=0)
        rank = tl.cumsum(hit, axis=0) - 1
        tl.store(SortedPairs + start + rank, p.to(tl.int64), mask=hit > 0)
        padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        tl.store(SortedPairs + start + cnt + rows, n, mask=rows < padded - cnt)
        tl.store(BlockExpert + start // BLOCK_M + bb, e, mask=bb < padded // BLOCK_M)
        start += padded
    used = start // BLOCK_M
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + bb
        tl.store(BlockExpert + b, -1, mask=(b >= used) & (b < num_blocks))
    for r0 in range(0, num_blocks * BLOCK_M, BLOCK_P):
        r = r0 + p
        tl.store(SortedPairs + r, n, mask=(r >= start) & (r < num_blocks * BLOCK_M))


def _use_align_kernel(n: int, num_experts: int, device: torch.device) -> bool:
    return n <= ALIGN_MAX_PAIRS and n * triton.next_power_of_2(num_experts) <= 65536


def _align_launch(ids: torch.Tensor, logits: torch.Tensor | None, scores: torch.Tensor | None, n: int,
                  num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = triton.cdiv(n, block_m) + num_experts
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int64, device=ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int64, device=ids.device)
    from_logits = logits is not None
    _align_kernel[(1,)](ids, logits if from_logits else ids, scores if from_logits else ids, sorted_pairs,
                        block_expert, n, num_blocks, logits.stride(0) if from_logits else 0,
                        E=num_experts, FROM_LOGITS=from_logits, BLOCK_P=max(16, triton.next_power_of_2(n)),
                        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=block_m,
                        BLOCK_B=max(2, triton.next_power_of_2(triton.cdiv(n, block_m))))
    return sorted_pairs, block_expert


def align_by_expert(top_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [num_blocks * block_m], block_expert [num_blocks]) for top_ids [T, k]."""
    n = top_ids.numel()
    if n == 0 or not _use_align_kernel(n, num_experts, top_ids.device):
        return align_by_expert_torch(top_ids, num_experts, block_m)
    return _align_launch(top_ids.reshape(-1).contiguous(), None, None, n, num_experts, block_m)


def route_top1(logits: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 sigmoid routing and alignment in one kernel: logits [T, E] -> (top_ids [T, 1], scores [T] float32
    holding sigmoid(top logit) rounded to the logits' dtype, sorted_pairs, block_expert)."""
    t, num_experts = logits.shape
    ids = torch.empty((t, 1), dtype=torch.int64, device=logits.device)
    scores = torch.empty(t, dtype=torch.float32, device=logits.device)
    if t == 0 or not _use_align_kernel(t, num_experts, logits.device):
        top_val, ids = logits.topk(1, dim=-1)
        scores = torch.sigmoid(top_val.float()).to(logits.dtype).float().reshape(-1)
        return (ids, scores, *align_by_expert_torch(ids, num_experts, block_m))
    sorted_pairs, block_expert = _align_launch(ids, logits, scores, t, num_experts, block_m)
    return ids, scores, sorted_pairs, block_expert


@triton.jit
def block_rows(BlockExpert, SortedPairs, num_pairs, N, TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A grouped MoE GEMM program's tile (row block program_id(0), column block program_id(1)): the block's expert
    (-1: an empty block, the program has nothing to do), its (token, expert) pairs and their mask, the rows of A
    they read (gate-up reads tokens, down reads pairs), the output columns and their mask."""
    pid_m = tl.program_id(0)
    e = tl.load(BlockExpert + pid_m)
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = pairs // TOP_K if A_PER_TOKEN else pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, pairs, row_ok, a_rows, cols, cols < N


@triton.jit
def _moe_gemm_kernel(A, W, Out, SortedPairs, BlockExpert, Scores, AScale, WScale, Add,
                     num_pairs, N, K, k_split, TOP_K: tl.constexpr, stride_am, stride_we, stride_wk, stride_wn,
                     stride_om, stride_os, stride_add,
                     A_PER_TOKEN: tl.constexpr, MUL_SCORE: tl.constexpr, QUANT_A: tl.constexpr, FP8: tl.constexpr,
                     ADD: tl.constexpr, PARTIAL: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e, pairs, row_ok, a_rows, cols, col_ok = block_rows(BlockExpert, SortedPairs, num_pairs, N, TOP_K, A_PER_TOKEN,
                                                        BLOCK_M, BLOCK_N)
    if e < 0:
        return
    pid_s = tl.program_id(2)
    kk = tl.arange(0, BLOCK_K)
    k_lo = pid_s * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    a_ptrs = A + a_rows[:, None].to(tl.int64) * stride_am + kk[None, :]
    w_ptrs = W + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + cols[None, :] * stride_wn
    if MUL_SCORE:
        score = tl.load(Scores + pairs, mask=row_ok, other=0.0).to(tl.float32)
    if FP8:
        a_scale = tl.load(AScale)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + kk) < k_hi
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if MUL_SCORE:  # rounded to A's dtype, as the reference's x * score is
            a = (a.to(tl.float32) * score[:, None]).to(A.dtype.element_ty)
        if QUANT_A:  # per-tensor FP8 activation quantization, as quantize_fp8
            a = round_e4m3(a.to(tl.float32) / a_scale).to(w.dtype)
        elif MUL_SCORE:
            a = a.to(w.dtype)
        acc += tl.dot(a, w, input_precision=PREC)
    if FP8:
        acc = acc * (a_scale * tl.load(WScale + e))
    mask = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:  # float32 partial of split pid_s, summed by the next kernel
        o_ptrs = Out + pid_s.to(tl.int64) * stride_os + pairs[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(o_ptrs, acc, mask=mask)
    else:
        y = acc.to(Out.dtype.element_ty)
        if ADD:  # the shared expert's output, added as the reference's bf16 `shared + routed`
            add = tl.load(Add + (pairs // TOP_K)[:, None].to(tl.int64) * stride_add + cols[None, :], mask=mask,
                          other=0.0)
            y = (y.to(tl.float32) + add.to(tl.float32)).to(Out.dtype.element_ty)
        tl.store(Out + pairs[:, None].to(tl.int64) * stride_om + cols[None, :], y, mask=mask)


@triton.jit
def _quant_pairs_kernel(X, Scores, S, Y, stride_x, stride_y, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """Y[p] = fp8((x[p // TOP_K] * score[p]) rounded to x's dtype / S): the gate-up GEMM's A, quantized once."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + (p // TOP_K).to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    a = (x.to(tl.float32) * tl.load(Scores + p)).to(X.dtype.element_ty)
    y = round_e4m3(a.to(tl.float32) / tl.load(S))
    tl.store(Y + p.to(tl.int64) * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_partials_kernel(X, Y, S, Ref, num_splits, stride_xs, stride_x, stride_y, N,
                              HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """silu(gate) * up over the sum of the float32 split-K partials X [S, P, 2N], rounded to the model dtype (Ref's)
    first, as the unsplit GEMM's output would be."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        base = X + s * stride_xs + row * stride_x
        g += tl.load(base + cols, mask=mask, other=0.0)
        u += tl.load(base + N + cols, mask=mask, other=0.0)
    dt = Ref.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    u = u.to(dt)
    y = (g / (1.0 + tl.exp(-g))).to(dt) * u
    if HAS_SCALE:
        y = round_e4m3(y.to(tl.float32) / tl.load(S))
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(X, Add, Y, num_splits, stride_xs, stride_x, stride_add, stride_y, N,
                   TOP_K: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    """Y[t] = Add[t] + sum_j round(sum_s X[s, t * TOP_K + j]) (the reference's rounding points)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(TOP_K):
        part = tl.zeros([BLOCK], tl.float32)
        for s in range(num_splits):
            part += tl.load(X + s * stride_xs + (t * TOP_K + j) * stride_x + cols, mask=mask, other=0.0).to(
                tl.float32)
        acc += part.to(Y.dtype.element_ty).to(tl.float32)
    y = acc.to(Y.dtype.element_ty) if TOP_K > 1 else acc
    if HAS_ADD:
        y = (y.to(tl.float32) + tl.load(Add + t * stride_add + cols, mask=mask, other=0.0).to(tl.float32))
    tl.store(Y + t * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch(num_pairs: int, n: int, k: int, num_experts: int, a_bytes: int = 1, w_bytes: int = 1) -> dict:
    """Launch parameters from the H200 sweep on Scout shapes (benchmarks/moe_bench.py, FP8 weights [E, N, K]):
    256-wide K steps (128 at most 16 pairs); 16-row blocks up to 128 pairs, 64-row blocks beyond; split-K when
    the programs of the experts hit would not fill the GPU (up to 2048 programs at most 16 pairs, from the
    one-token SPLIT_SWEEP=1 of benchmarks/moe_bench.py, H200, 2026-11-30; NOTE: that sweep timed eager launches,
    ~30 us of Python launch each, so its absolute times are launch-bound; top-1 steps of that size now take
    kernels/moe_decode.py, and these tiny-batch launches serve top-k > 1 only). Wider operands (bf16 A or W:
    `a_bytes`, `w_bytes`) get fewer pipeline stages, then narrower K steps, so the stages fit in `SMEM_BYTES`."""
    block_m = 16 if num_pairs <= 128 else 64
    block_n = 64 if num_pairs <= 16 or n > 8192 else 128
    tiny = num_pairs <= 16
    block_k = min(128 if tiny else 256, max(16, triton.next_power_of_2(k)))
    warps = 8 if block_m == 64 else 4
    stages = 4
    while stages * block_k * (block_m * a_bytes + block_n * w_bytes) > SMEM_BYTES:
        if stages > 2:
            stages -= 1
        else:
            block_k //= 2
    programs = min(num_pairs, num_experts) * triton.cdiv(n, block_n)
    split = 1
    while programs * split < (2048 if tiny else 1024) and k // (split * 2) >= 2 * block_k and split < 16:
        split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages,
            "SPLIT_K": split}


def launch_override(name: str, cfg: dict, a_bytes: int, w_bytes: int) -> dict:
    """`cfg` with BLOCK_N, BLOCK_K, warps, stages and SPLIT_K from the environment variable `name`
    (LLAMASERVE_FUSED_MOE_GATE_UP / LLAMASERVE_FUSED_MOE_DOWN = "BLOCK_NxBLOCK_KxWARPSxSTAGESxSPLIT_K", e.g.
    128x256x4x4x1; an A/B switch for sweeps inside a model step, benchmarks/decode_variants.py with BATCH); unset:
    `cfg` as it is. BLOCK_M stays `_launch`'s (the alignment pads to it)."""
    default = (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"], cfg["SPLIT_K"])
    values = launch_from_env(name, default, "BLOCK_NxBLOCK_KxWARPSxSTAGESxSPLIT_K")
    if values == default:
        return cfg
    block_n, block_k, warps, stages, split = values
    if stages * block_k * (cfg["BLOCK_M"] * a_bytes + block_n * w_bytes) > SMEM_BYTES:
        raise ValueError(f"{name}={os.environ.get(name)!r}: {stages} stages of {block_k}-wide K steps for "
                         f"{cfg['BLOCK_M']} x {block_n} tiles need more than {SMEM_BYTES} bytes of shared memory; "
                         "use fewer stages or narrower steps")
    return {**cfg, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages,
            "SPLIT_K": split}


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor,
          block_expert: torch.Tensor, scores: torch.Tensor, top_k: int, a_per_token: bool, mul_score: bool,
          a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, block_m: int,
          config: dict | None = None, add: torch.Tensor | None = None) -> None:
    """out [P, N] (or float32 partials [S, P, N] when config's SPLIT_K > 1) = rows of A @ W[expert]."""
    num_pairs = out.shape[-2]
    _, k, n = w.shape
    cfg = dict(config if config is not None else _launch(num_pairs, n, k, w.shape[0]))
    cfg.pop("BLOCK_M", None)
    split = cfg.pop("SPLIT_K", 1)
    k_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    fp8 = w.dtype == torch.float8_e4m3fn
    quant_a = fp8 and a.dtype != torch.float8_e4m3fn
    grid = (block_expert.numel(), triton.cdiv(n, cfg["BLOCK_N"]), split)
    _moe_gemm_kernel[grid](
        a, w, out, sorted_pairs, block_expert, scores, a_scale if fp8 else scores, w_scale if fp8 else scores,
        add if add is not None else scores, num_pairs, n, k, k_split, top_k, a.stride(0), w.stride(0), w.stride(1),
        w.stride(2), out.stride(-2), out.stride(0) if split > 1 else 0, add.stride(0) if add is not None else 0,
        A_PER_TOKEN=a_per_token, MUL_SCORE=mul_score, QUANT_A=quant_a, FP8=fp8, ADD=add is not None,
        PARTIAL=split > 1, PREC="ieee" if w.dtype == torch.float32 else "tf32", BLOCK_M=block_m, **cfg)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor | None,
              top_scores: torch.Tensor | None, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
              a2_scale: torch.Tensor | None = None, shared: torch.Tensor | Callable[[], torch.Tensor] | None = None,
              router_logits: torch.Tensor | None = None) -> torch.Tensor:
    """shared + sum over k of expert_{top_ids}(x * top_scores): x [T, H]; gate_up [E, H, 2I]; down [E, I, H]
    (any strides). With `router_logits` [T, E] instead of top_ids / top_scores: top-1 sigmoid routing in the
    alignment kernel. FP8 weights take per-expert scales (gate_up_scale, down_scale [E]) and per-tensor activation
    scales a1 (of the score-scaled token) / a2 (of the SiLU-and-mul output); None: dynamic, a1 = amax(x) / 448
    (scores are at most 1), a2 = amax / 448 of the activation. `shared` may be a callable returning the tensor
    (layers/moe.py's join with the shared expert's stream), called only when the tensor is needed."""
    from llamaserve.layers.quantization import dynamic_scale, quantize_fp8

    t, h = x.shape
    num_experts, _, two_i = gate_up.shape
    top_k = 1 if router_logits is not None else top_ids.shape[1]
    num_pairs = t * top_k
    if top_k == 1 and 0 < num_pairs <= moe_decode.DECODE_MAX_PAIRS:  # decode: weight streams, no sort
        return moe_decode.fused_moe_decode(x, gate_up, down, top_ids, top_scores, gate_up_scale, down_scale,
                                           a1_scale, a2_scale, shared, router_logits)
    shared = shared() if callable(shared) else shared
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    prequant = fp8 and num_pairs >= PREQUANT_MIN_PAIRS
    a_bytes = 1 if prequant else x.element_size()
    cfg1 = launch_override("LLAMASERVE_FUSED_MOE_GATE_UP", _launch(num_pairs, two_i, h, num_experts, a_bytes,
                                                                   gate_up.element_size()),
                           a_bytes, gate_up.element_size())
    block_m = cfg1["BLOCK_M"]
    if router_logits is not None:
        _, scores, sorted_pairs, block_expert = route_top1(router_logits, block_m)
    else:
        sorted_pairs, block_expert = align_by_expert(top_ids, num_experts, block_m)
        scores = top_scores.reshape(-1).float().contiguous()
    s1 = (a1_scale if a1_scale is not None else dynamic_scale(x)) if fp8 else None
    split1 = cfg1["SPLIT_K"]
    inter = torch.empty((split1, num_pairs, two_i) if split1 > 1 else (num_pairs, two_i),
                        dtype=torch.float32 if split1 > 1 else x.dtype, device=x.device)
    a = x  # the GEMM reads each pair's token and scales (and, for FP8, quantizes) it
    if prequant:  # A = the score-scaled pairs in FP8, written once
        a = torch.empty((num_pairs, h), dtype=gate_up.dtype, device=x.device)
        block = min(1024, triton.next_power_of_2(h))
        _quant_pairs_kernel[(num_pairs, triton.cdiv(h, block))](x, scores, s1, a, x.stride(0), a.stride(0), h,
                                                                 TOP_K=top_k, BLOCK=block)
    _gemm(a, gate_up, inter, sorted_pairs, block_expert, scores, top_k, not prequant, not prequant, s1,
          gate_up_scale, block_m, config=cfg1)
    s2 = None
    if fp8:
        s2 = a2_scale
        if s2 is None:  # dynamic: the activation in the model dtype first, then its amax
            act = _silu_mul(inter, None, x)
            s2 = dynamic_scale(act)
            act = quantize_fp8(act, s2)
        else:
            act = _silu_mul(inter, s2, x)
    else:
        act = _silu_mul(inter, None, x)
    a2_bytes = 1 if fp8 else x.element_size()
    cfg2 = launch_override("LLAMASERVE_FUSED_MOE_DOWN",
                           {**_launch(num_pairs, h, two_i // 2, num_experts, a2_bytes, down.element_size()),
                            "BLOCK_M": block_m}, a2_bytes, down.element_size())
    split2 = cfg2["SPLIT_K"]
    direct = split2 == 1 and top_k == 1
    out = torch.empty((t, h) if direct else (split2, num_pairs, h) if split2 > 1 else (num_pairs, h),
                      dtype=torch.float32 if split2 > 1 else x.dtype, device=x.device)
    _gemm(act, down, out, sorted_pairs, block_expert, scores, top_k, False, False, s2, down_scale, block_m,
          config=cfg2, add=shared if direct else None)
    if direct:
        return out
    y = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(h))
        parts = out if split2 > 1 else out.unsqueeze(0)
        _reduce_kernel[(t, triton.cdiv(h, block))](
            parts, shared if shared is not None else parts, y, parts.shape[0], parts.stride(0), parts.stride(1),
            shared.stride(0) if shared is not None else 0, y.stride(0), h, TOP_K=top_k,
            HAS_ADD=shared is not None, BLOCK=block)
    return y


def _silu_mul(inter: torch.Tensor, out_scale: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """silu_and_mul of the gate-up output, or of the sum of its float32 split-K partials [S, P, 2I]; `ref` is a
    tensor of the model dtype."""
    if inter.dim() == 2:
        return silu_and_mul(inter, out_scale)
    _, p, two_n = inter.shape
    n = two_n // 2
    y = torch.empty((p, n), dtype=torch.float8_e4m3fn if out_scale is not None else ref.dtype, device=inter.device)
    if p:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_partials_kernel[(p, triton.cdiv(n, block))](
            inter, y, out_scale if out_scale is not None else inter, ref, inter.shape[0], inter.stride(0),
            inter.stride(1), y.stride(0), n, HAS_SCALE=out_scale is not None, BLOCK=block)
    return y
