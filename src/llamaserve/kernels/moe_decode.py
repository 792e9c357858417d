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
3. The same kernel without GLU for the down projection, adding the shared expert's output in its epilogue.

`router_logits` computes the router's logits for such steps in one kernel, and `glu_decode` runs a dense gate-up
layer with its SiLU through the same GEMM kernel (one "expert"): layers/moe.py uses both for Llama 4.
Launch parameters: `decode_config` (H200 sweep, benchmarks/decode_bench.py). Reference:
layers/moe.py `fused_experts_torch` / `fused_experts_fp8_torch`, the same as kernels/fused_moe.py's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from llamaserve.kernels.norm_act import round_e4m3

DECODE_MAX_PAIRS = 16  # one 16-row tile holds every token of the step
SMEM_BYTES = 200 * 1024


@triton.jit
def _route_scale_kernel(X, Logits, Ids, Scores, S, A, stride_x, stride_l, stride_a, H, E: tl.constexpr,
                        FROM_LOGITS: tl.constexpr, QUANT: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK: tl.constexpr):
    t = tl.program_id(0)
    chunk = tl.program_id(1)
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
        a = round_e4m3(a.to(tl.float32) / tl.load(S))
    tl.store(A + t.to(tl.int64) * stride_a + cols, a.to(A.dtype.element_ty), mask=mask)


@triton.jit
def _norm_route_kernel(X, R, NW, RW, Logits, Counter, Ids, Scores, A, S1, Y8, S8, stride_x, stride_r, stride_rw,
                       stride_a, stride_y8, H, eps, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """Program (t, e): y = RMSNorm(x + residual) of token t (as kernels/norm_act.py) and the router's logit
    y . W_e (rounded to the model dtype). The last of the token's E programs to finish (an arrival counter)
    takes the first largest logit and its sigmoid score, and writes x + residual back, y in FP8 for the shared
    expert (S8) and A = y * score in FP8 (S1) for the routed expert."""
    t = tl.program_id(0)
    e = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + t * stride_x + cols, mask=mask, other=0.0)
    x = x + tl.load(R + t * stride_r + cols, mask=mask, other=0.0)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / H + eps)
    y = tl.load(NW + cols, mask=mask, other=0.0) * h.to(x.dtype)
    yf = y.to(tl.float32)
    w = tl.load(RW + e * stride_rw + cols, mask=mask, other=0.0)
    tl.store(Logits + t * E + e, tl.sum(yf * w.to(tl.float32), 0).to(X.dtype.element_ty).to(tl.float32))
    tl.debug_barrier()  # the logit store (and every read of R) precede the release below
    if tl.atomic_add(Counter + t, 1, sem="acq_rel", scope="gpu") == E - 1:
        tl.store(Counter + t, 0)  # reset for the next launch
        ee = tl.arange(0, BLOCK_E)
        lg = tl.load(Logits + t * E + ee, mask=ee < E, other=float("-inf"), cache_modifier=".cg")
        best = tl.max(lg, axis=0)
        idx = tl.min(tl.where(lg == best, ee, BLOCK_E), axis=0)
        score = tl.sigmoid(best).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Ids + t, idx.to(Ids.dtype.element_ty))
        tl.store(Scores + t, score)
        tl.store(R + t * stride_r + cols, x, mask=mask)  # every program of the token has read R by now
        tl.store(Y8 + t * stride_y8 + cols, round_e4m3(yf / tl.load(S8)).to(Y8.dtype.element_ty), mask=mask)
        a = (yf * score).to(X.dtype.element_ty)
        tl.store(A + t * stride_a + cols, round_e4m3(a.to(tl.float32) / tl.load(S1)).to(A.dtype.element_ty),
                 mask=mask)


@triton.jit
def _decode_gemm_kernel(A, W, Out, Ids, AScale, WScale, Add, OScale, Ref, A2, W2, AScale2, WScale2, num_pairs, N, K,
                        up_off, stride_am, stride_we, stride_wk, stride_wn, stride_om, stride_add, stride_a2,
                        stride_w2k, stride_w2n,
                        FP8: tl.constexpr, GLU: tl.constexpr, ADD: tl.constexpr, QUANT_OUT: tl.constexpr,
                        SINGLE: tl.constexpr, PAIR: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + kk[None, :]
    w_ptrs = W + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wn
    a2_ptrs = A2 + rows[:, None] * stride_a2 + kk[None, :]  # PAIR: the second GEMM (same rows, N and K)
    w2_ptrs = W2 + kk[:, None] * stride_w2k + cols[None, :].to(tl.int64) * stride_w2n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # GLU: the up columns; PAIR: the second GEMM
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk)
        else:
            k_ok = (k0 + kk) < K
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PREC)
        if PAIR:
            if EVEN:
                a2 = tl.load(a2_ptrs + k0, mask=row_ok[:, None], other=0.0)
                w2 = tl.load(w2_ptrs + k0 * stride_w2k)
            else:
                a2 = tl.load(a2_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w2 = tl.load(w2_ptrs + k0 * stride_w2k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_u += tl.dot(a2, w2, input_precision=PREC)
        if GLU:  # the up columns sit `up_off` elements after the gate columns
            if EVEN:
                wu = tl.load(w_ptrs + up_off + k0 * stride_wk)
            else:
                wu = tl.load(w_ptrs + up_off + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_u += tl.dot(a, wu, input_precision=PREC)
    if FP8:
        scale = tl.load(AScale) * tl.load(WScale + e)
        acc = acc * scale
        if PAIR:
            acc_u = acc_u * (tl.load(AScale2) * tl.load(WScale2))
        else:
            acc_u = acc_u * scale
    mask = row_ok[:, None] & col_ok[None, :]
    dt = Ref.dtype.element_ty  # the model dtype, where the reference rounds
    if GLU:  # silu(gate) * up with the reference's roundings: GEMM output, silu, product
        g = acc.to(dt).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(dt) * acc_u.to(dt)
        if QUANT_OUT:
            y = round_e4m3(y.to(tl.float32) / tl.load(OScale))
    else:
        y = acc.to(dt)
        if PAIR:  # both GEMMs rounded to the model dtype, then summed as `shared + routed`
            y = (y.to(tl.float32) + acc_u.to(dt).to(tl.float32)).to(dt)
        if ADD:  # the shared expert's output, added as the reference's `shared + routed` in the model dtype
            add = tl.load(Add + rows[:, None] * stride_add + cols[None, :], mask=mask, other=0.0)
            y = (y.to(tl.float32) + add.to(tl.float32)).to(dt)
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


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


PAIR_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}  # see decode_config


def decode_config(n: int, k: int, glu: bool, a_bytes: int, w_bytes: int, pair: bool = False) -> dict:
    """Launch parameters from the H200 sweep at one token (benchmarks/decode_bench.py, CUDA graphs, 16 experts
    rotated): gate-up with SiLU 32 + 32 columns per program, 128-wide K steps, 2 warps, 6 stages: 22.9 us for one
    Scout expert (3.66 TB/s; cuBLAS on the same matrix 22.4 us); down 64 columns, 512-wide K steps, 4 warps, 4
    stages: 14.9 us (2.81 TB/s; cuBLAS 13.5). Narrower K steps, then fewer stages, when the stages would not fit
    `SMEM_BYTES` (bf16 / fp32 operands) or K is small."""
    if pair:
        block_n, block_k, warps, stages = (PAIR_CONFIG[key] for key in ("BLOCK_N", "BLOCK_K", "num_warps",
                                                                      "num_stages"))
    else:
        block_n, block_k, warps, stages = (32, 128, 2, 6) if glu else (64, 512, 4, 4)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    per_k = (2 if pair else 1) * 16 * a_bytes + (2 if glu or pair else 1) * block_n * w_bytes
    while stages * block_k * per_k > SMEM_BYTES:
        if block_k > 128:
            block_k //= 2
        elif stages > 2:
            stages -= 1
        else:
            block_k //= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ids: torch.Tensor | None, n: int, glu: bool,
          a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, ref: torch.Tensor,
          add: torch.Tensor | None = None, out_scale: torch.Tensor | None = None, config: dict | None = None,
          pair: tuple | None = None) -> None:
    """out[p, :n] = A[p] @ W[ids[p]][:, :n] (GLU: silu of those columns times columns n..2n); ids None: every
    row takes W[0] (a dense layer). `pair` = (A2 [T, K], W2 [K, n] view, A2 scale, W2 scale): out also adds
    A2 @ W2, each product rounded to the model dtype first (not with GLU)."""
    num_pairs, k = a.shape
    cfg = dict(config or decode_config(n, k, glu, a.element_size(), w.element_size(), pair is not None))
    fp8 = w.dtype == torch.float8_e4m3fn
    even = k % cfg["BLOCK_K"] == 0 and n % cfg["BLOCK_N"] == 0
    grid = (num_pairs if ids is not None else 1, triton.cdiv(n, cfg["BLOCK_N"]))
    dummy = ids if ids is not None else a
    a2, w2, s2a, s2w = pair if pair is not None else (a, w[0], dummy, dummy)
    _decode_gemm_kernel[grid](
        a, w, out, dummy, a_scale if fp8 else dummy, w_scale if fp8 else dummy, add if add is not None else dummy,
        out_scale if out_scale is not None else dummy, ref, a2, w2, s2a if fp8 else dummy, s2w if fp8 else dummy,
        num_pairs, n, k, n * w.stride(2), a.stride(0),
        w.stride(0), w.stride(1), w.stride(2), out.stride(0), add.stride(0) if add is not None else 0,
        a2.stride(0), w2.stride(0), w2.stride(1),
        FP8=fp8, GLU=glu, ADD=add is not None, QUANT_OUT=out_scale is not None, SINGLE=ids is None,
        PAIR=pair is not None, EVEN=even,
        PREC="ieee" if w.dtype == torch.float32 else "tf32", BLOCK_M=16, **cfg)


def fused_moe_decode(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor | None,
                     top_scores: torch.Tensor | None, gate_up_scale: torch.Tensor | None,
                     down_scale: torch.Tensor | None, a1_scale: torch.Tensor | None, a2_scale: torch.Tensor | None,
                     shared: torch.Tensor | Callable[[], torch.Tensor] | None,
                     router_logits: torch.Tensor | None) -> torch.Tensor:
    """kernels/fused_moe.py's `fused_moe` for top-1 routing and 1..DECODE_MAX_PAIRS tokens (same arguments; a
    callable `shared` is called right before the down GEMM, which adds its result)."""
    from llamaserve.layers.quantization import dynamic_scale

    t, h = x.shape
    num_experts = gate_up.shape[0]
    assert 0 < t <= DECODE_MAX_PAIRS and (top_ids is None or top_ids.shape[1] == 1)
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    s1 = (a1_scale if a1_scale is not None else dynamic_scale(x)) if fp8 else None
    from_logits = router_logits is not None
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
        QUANT=fp8, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK=block)
    return experts_decode(a, ids, gate_up, down, s1, gate_up_scale, down_scale, a2_scale if fp8 else None, x, shared)


def experts_decode(a: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   s1: torch.Tensor | None, gate_up_scale: torch.Tensor | None, down_scale: torch.Tensor | None,
                   s2: torch.Tensor | None, ref: torch.Tensor,
                   shared: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """The two expert GEMMs of a routed decode step: A [T, H] (the score-scaled tokens, FP8 with s1 for FP8
    experts) and ids [T] -> [T, H] in `ref`'s dtype, plus `shared` (s2 None with FP8 experts: dynamic)."""
    from llamaserve.layers.quantization import dynamic_scale, quantize_fp8

    act = experts_gate_up(a, ids, gate_up, s1, gate_up_scale, s2, ref)
    if gate_up.dtype == torch.float8_e4m3fn and s2 is None:  # dynamic: the activation's amax first
        s2 = dynamic_scale(act)
        act = quantize_fp8(act, s2)
    return experts_down(act, ids, down, s2, down_scale, ref, add=shared() if callable(shared) else shared)


def experts_gate_up(a: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, s1: torch.Tensor | None,
                    gate_up_scale: torch.Tensor | None, s2: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """silu(A W_gate) * (A W_up) of each token's expert: [T, I], FP8 with s2 when given, else `ref`'s dtype."""
    inter = gate_up.shape[2] // 2
    act = torch.empty((a.shape[0], inter), dtype=torch.float8_e4m3fn if s2 is not None else ref.dtype,
                      device=a.device)
    _gemm(a, gate_up, act, ids, inter, True, s1, gate_up_scale, ref, out_scale=s2)
    return act


def experts_down(act: torch.Tensor, ids: torch.Tensor, down: torch.Tensor, s2: torch.Tensor | None,
                 down_scale: torch.Tensor | None, ref: torch.Tensor, add: torch.Tensor | None = None,
                 pair: tuple | None = None) -> torch.Tensor:
    """act [T, I] @ down[ids] -> [T, H] in `ref`'s dtype, plus `add`, or plus a second product in the same
    kernel: `pair` = (A2 [T, I], W2 [H, I] as a dense layer stores it, A2 scale, W2 scale) — Llama 4's shared
    expert's down projection, so one launch streams both down matrices (no second stream, no join)."""
    h = down.shape[2]
    out = torch.empty((act.shape[0], h), dtype=ref.dtype, device=act.device)
    if pair is not None:
        a2, w2, a2_scale, w2_scale = pair
        pair = (a2, w2.t(), a2_scale, w2_scale)
    _gemm(act, down, out, ids, h, False, s2, down_scale, ref, add=add, pair=pair)
    return out


def norm_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               router_weight: torch.Tensor, a1_scale: torch.Tensor, shared_scale: torch.Tensor,
               counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's post-attention RMSNorm, router and top-1 routing in one kernel (Llama 4 with FP8 experts
    and static input scales): residual += x in place; returns (A [T, H] FP8 = norm * score / a1_scale, ids [T],
    scores [T], the norm output in FP8 with `shared_scale` for the shared expert). One program per (token,
    expert); `counters`: at least T zeroed int32 (device_utils.arrival_counters), left zero. At one token it
    replaces three kernels (RMSNorm, router, route-and-scale)."""
    t, h = x.shape
    assert 0 < t <= DECODE_MAX_PAIRS
    num_experts = router_weight.shape[0]
    a = torch.empty((t, h), dtype=torch.float8_e4m3fn, device=x.device)
    y8 = torch.empty((t, h), dtype=torch.float8_e4m3fn, device=x.device)
    ids = torch.empty(t, dtype=torch.int64, device=x.device)
    scores = torch.empty(t, dtype=torch.float32, device=x.device)
    logits = torch.empty((t, num_experts), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(h)
    _norm_route_kernel[(t, num_experts)](
        x, residual, norm_weight, router_weight, logits, counters, ids, scores, a, a1_scale, y8, shared_scale,
        x.stride(0), residual.stride(0), router_weight.stride(0), a.stride(0), y8.stride(0), h, eps,
        E=num_experts, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return a, ids, scores, y8


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
