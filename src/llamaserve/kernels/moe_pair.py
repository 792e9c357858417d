"""A one-token Llama 4 MoE layer (top-1 routed expert + shared expert) in two launches, one stream.

At batch 1 kernels/moe_decode.py runs a Scout MoE layer as two chains on two CUDA streams (routing kernel, routed
gate-up, routed down; shared gate-up, shared down) whose sum the next RMSNorm adds. The two chains start apart
(the routing kernel waits behind the shared gate-up's traffic) and the routed down runs alone at its end. Here
both experts share each launch instead:

1. `_pair_glu_kernel`: program n owns rows [n * BLOCK_N, +BLOCK_N) of both experts' gate and up matrices (four
   row bands, K contiguous), routes the token itself from the router's logits (first largest logit, score =
   sigmoid of it rounded to the logits' dtype), builds both inputs from x slice by slice (routed: x * score
   rounded to x's dtype; FP8: each quantized with its static input scale, as `_route_scale_kernel` and the norm's
   FP8 copy round them), and writes silu(gate) * up of both experts (FP8 with each down projection's static input
   scale, or the model dtype) to a [2, I] buffer (row 0 shared, row 1 routed).
2. `_pair_down_kernel`: program n owns output columns [n * BLOCK_N, +BLOCK_N) and streams both down matrices'
   rows (K = I each) in one loop; the epilogue rounds each expert's output to the model dtype and adds them
   (`shared + routed` in the model dtype, as the reference and transformers do).

Plain loads and float32 products (a one-row GEMV, no tensor cores, as kernels/gemv.py). The glu kernel is a PDL
dependent of the norm + router kernel before it, the down kernel of the glu kernel, and the down kernel lets the
next layer's input norm launch early (kernels/pdl.py). Launches: LLAMASERVE_MOE_PAIR_GLU / _DOWN
("BLOCK_NxBLOCK_KxWARPS"). Reference: layers/moe.py's `fused_experts_torch` / `fused_experts_fp8_torch` plus the
shared expert module; tests/kernels/test_moe_pair.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamaserve.kernels import launch_from_env
from llamaserve.kernels.moe_decode import glu_out
from llamaserve.kernels.norm_act import round_e4m3
from llamaserve.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_args, trigger_early

GLU_LAUNCH = (4, 1024, 4)  # (BLOCK_N, BLOCK_K, warps): four bands of 4 rows x 1 KB per K step
DOWN_LAUNCH = (8, 1024, 4)
LAUNCH_FIELDS = "BLOCK_NxBLOCK_KxWARPS"


@triton.jit
def _route(Logits, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, score) of top-1 routing from one token's logits: the first largest logit, its sigmoid rounded to
    the logits' dtype (as kernels/moe_decode.py `_route_scale_kernel`)."""
    ee = tl.arange(0, BLOCK_E)
    lg = tl.load(Logits + ee, mask=ee < E, other=float("-inf")).to(tl.float32)
    best = tl.max(lg, axis=0)
    e = tl.min(tl.where(lg == best, ee, BLOCK_E), axis=0)
    return e, tl.sigmoid(best).to(Logits.dtype.element_ty).to(tl.float32)


@triton.jit
def _pair_glu_kernel(X, Logits, Wr, Ws, Hbuf, S1r, S1s, WSr, WSs, S2r, S2s, K, I, stride_wre, stride_wrn,
                     stride_wsn, stride_h, E: tl.constexpr, BLOCK_E: tl.constexpr, FP8: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    kk = tl.arange(0, BLOCK_K)
    if FP8:  # scales (no earlier kernel writes them): before the wait
        s1r, s1s = tl.load(S1r), tl.load(S1s)
        s2r, s2s = tl.load(S2r), tl.load(S2s)
        wss = tl.load(WSs)
    ws_ptrs = Ws + rows[:, None].to(tl.int64) * stride_wsn + kk[None, :]
    up_s = I.to(tl.int64) * stride_wsn
    if PDL:  # the logits and x are the norm + router kernel's outputs
        gdc_wait()
    e, score = _route(Logits, E, BLOCK_E)
    wr_ptrs = Wr + e.to(tl.int64) * stride_wre + rows[:, None].to(tl.int64) * stride_wrn + kk[None, :]
    up_r = I.to(tl.int64) * stride_wrn
    acc_gs = tl.zeros([BLOCK_N], tl.float32)
    acc_us = tl.zeros([BLOCK_N], tl.float32)
    acc_gr = tl.zeros([BLOCK_N], tl.float32)
    acc_ur = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        m = row_ok[:, None] & k_ok[None, :]
        gs = tl.load(ws_ptrs + k0, mask=m, other=0.0).to(tl.float32)
        us = tl.load(ws_ptrs + up_s + k0, mask=m, other=0.0).to(tl.float32)
        gr = tl.load(wr_ptrs + k0, mask=m, other=0.0).to(tl.float32)
        ur = tl.load(wr_ptrs + up_r + k0, mask=m, other=0.0).to(tl.float32)
        x = tl.load(X + k0 + kk, mask=k_ok, other=0.0)
        a_r = (x.to(tl.float32) * score).to(X.dtype.element_ty).to(tl.float32)  # the reference's x * score
        a_s = x.to(tl.float32)
        if FP8:  # the FP8 values the reference's inputs hold (times their scales after the loop)
            a_r = round_e4m3(a_r / s1r)
            a_s = round_e4m3(a_s / s1s)
        acc_gs += tl.sum(gs * a_s[None, :], 1)
        acc_us += tl.sum(us * a_s[None, :], 1)
        acc_gr += tl.sum(gr * a_r[None, :], 1)
        acc_ur += tl.sum(ur * a_r[None, :], 1)
    if FP8:
        sr = s1r * tl.load(WSr + e)
        ss = s1s * wss
        acc_gr, acc_ur = acc_gr * sr, acc_ur * sr
        acc_gs, acc_us = acc_gs * ss, acc_us * ss
        ys = glu_out(acc_gs, acc_us, X, S2s, True, s2s)
        yr = glu_out(acc_gr, acc_ur, X, S2r, True, s2r)
    else:
        ys = glu_out(acc_gs, acc_us, X, S2s, False)
        yr = glu_out(acc_gr, acc_ur, X, S2r, False)
    tl.store(Hbuf + rows, ys.to(Hbuf.dtype.element_ty), mask=row_ok)
    tl.store(Hbuf + stride_h + rows, yr.to(Hbuf.dtype.element_ty), mask=row_ok)


@triton.jit
def _pair_down_kernel(Hbuf, Logits, Wr, Ws, Out, S2r, S2s, WSr, WSs, N, K, stride_wre, stride_wrn, stride_wsn,
                      stride_h, E: tl.constexpr, BLOCK_E: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PDL: tl.constexpr = False, TRIGGER: tl.constexpr = False):
    if TRIGGER:  # the next layer's input norm (a PDL launch) may start beside this kernel
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    kk = tl.arange(0, BLOCK_K)
    if FP8:
        ss = tl.load(S2s) * tl.load(WSs)
        s2r = tl.load(S2r)
    e, _ = _route(Logits, E, BLOCK_E)  # written before the glu kernel started: readable before the wait
    sr = s2r * tl.load(WSr + e) if FP8 else 1.0
    ws_ptrs = Ws + rows[:, None].to(tl.int64) * stride_wsn + kk[None, :]
    wr_ptrs = Wr + e.to(tl.int64) * stride_wre + rows[:, None].to(tl.int64) * stride_wrn + kk[None, :]
    if PDL:  # the activations are the glu kernel's output
        gdc_wait()
    acc_s = tl.zeros([BLOCK_N], tl.float32)
    acc_r = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        m = row_ok[:, None] & k_ok[None, :]
        ws = tl.load(ws_ptrs + k0, mask=m, other=0.0).to(tl.float32)
        wr = tl.load(wr_ptrs + k0, mask=m, other=0.0).to(tl.float32)
        hs = tl.load(Hbuf + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        hr = tl.load(Hbuf + stride_h + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        acc_s += tl.sum(ws * hs[None, :], 1)
        acc_r += tl.sum(wr * hr[None, :], 1)
    if FP8:
        acc_s, acc_r = acc_s * ss, acc_r * sr
    dt = Out.dtype.element_ty
    y = (acc_s.to(dt).to(tl.float32) + acc_r.to(dt).to(tl.float32)).to(dt)  # shared + routed, model dtype
    tl.store(Out + rows, y, mask=row_ok)


def pair_launch(name: str, default: tuple[int, int, int]) -> dict:
    block_n, block_k, warps = launch_from_env(name, default, LAUNCH_FIELDS)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}


def moe_pair_decode(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
                    scales: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """One token's Llama 4 MoE output, shared expert included: x [1, H] (the post-attention norm's output, model
    dtype), logits [1, E] (the router's, x's dtype), routed `gate_up` [E, H, 2I] / `down` [E, I, H] in the
    model's K-contiguous layout (layers/moe.py FusedExperts), the shared expert's `shared_gate_up` [2I, H] (gate
    rows first) and `shared_down` [H, I] (nn.Linear layout). FP8 weights take `scales` = (routed gate-up input,
    shared gate-up input, routed gate-up weight [E], shared gate-up weight, routed down input, shared down input,
    routed down weight [E], shared down weight), every input scale static (float32 scalars). Returns [1, H] in
    x's dtype: shared + routed."""
    t, h = x.shape
    num_experts, _, two_i = gate_up.shape
    inter = two_i // 2
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    if t != 1 or logits.shape != (1, num_experts) or (fp8 and (scales is None or len(scales) != 8)):
        raise ValueError(f"moe_pair_decode takes one token and, for FP8 weights, 8 scales: x {tuple(x.shape)}, "
                         f"logits {tuple(logits.shape)}, scales {None if scales is None else len(scales)}")
    for w in (gate_up, down):
        assert w.stride(1) == 1, "expert weights are stored K-contiguous ([E, N, K] in memory)"
    assert shared_gate_up.stride(1) == 1 and shared_down.stride(1) == 1 and x.stride(1) == 1
    hbuf = torch.empty((2, inter), dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    out = torch.empty_like(x)
    s1r, s1s, wsr, wss, s2r, s2s, wdr, wds = scales if fp8 else (x,) * 8  # unused pointers when float
    block_e = triton.next_power_of_2(num_experts)
    pdl = pdl_args(x.device)
    glu = pair_launch("LLAMASERVE_MOE_PAIR_GLU", GLU_LAUNCH)
    _pair_glu_kernel[(triton.cdiv(inter, glu["BLOCK_N"]),)](
        x, logits, gate_up, shared_gate_up, hbuf, s1r, s1s, wsr, wss, s2r, s2s, h, inter, gate_up.stride(0),
        gate_up.stride(2), shared_gate_up.stride(0), hbuf.stride(0), E=num_experts, BLOCK_E=block_e, FP8=fp8,
        **glu, **pdl)
    dn = pair_launch("LLAMASERVE_MOE_PAIR_DOWN", DOWN_LAUNCH)
    _pair_down_kernel[(triton.cdiv(h, dn["BLOCK_N"]),)](
        hbuf, logits, down, shared_down, out, s2r, s2s, wdr, wds, h, inter, down.stride(0), down.stride(2),
        shared_down.stride(0), hbuf.stride(0), E=num_experts, BLOCK_E=block_e, FP8=fp8,
        TRIGGER=trigger_early(x.device), **dn, **pdl)
    return out
