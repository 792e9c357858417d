"""Decode-sized fused MoE (kernels/moe_decode.py): against the torch references and the grouped-GEMM path."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels import fused_moe as fm
from llamaserve.kernels import moe_decode
from llamaserve.layers.moe import fused_experts_fp8_torch, fused_experts_torch
from llamaserve.layers.quantization import quantize_fp8


def _inputs(t, h, inter, e, device, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(device, dtype)
    gate_up = (torch.randn(e, h, 2 * inter, generator=gen) * h**-0.5).to(device, dtype)
    down = (torch.randn(e, inter, h, generator=gen) * inter**-0.5).to(device, dtype)
    logits = torch.randn(t, e, generator=gen).to(device, dtype)
    shared = torch.randn(t, h, generator=gen).to(device, dtype)
    return x, gate_up, down, logits, shared


def _route(logits, dtype):
    top_val, ids = logits.topk(1, dim=-1)
    return ids, torch.sigmoid(top_val.float()).to(dtype)


def _nk(w):
    """The [E, N, K] (K-contiguous) memory layout the model stores expert weights in."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("t,h,inter,e", [(1, 256, 128, 4), (5, 96, 80, 3), (16, 128, 64, 4)])
def test_float_matches_reference(t, h, inter, e, device):
    """bf16/fp32 experts, tokens sharing experts (3-4 experts for up to 16 tokens), even and ragged shapes: the
    kernel gives the reference's result, with the shared expert added and routed from logits or from ids."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, gate_up, down, logits, shared = _inputs(t, h, inter, e, device, t * 7 + h, dtype)
    ids, scores = _route(logits, dtype)
    if t > 4:
        assert ids.unique().numel() < t  # some tokens share an expert: only one program streams it
    want = shared.float() + fused_experts_torch(x, gate_up, down, ids, scores).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for gu, dn in ((gate_up, down), (_nk(gate_up), _nk(down))):
        got = moe_decode.fused_moe_decode(x, gu, dn, ids, scores, None, None, None, None, shared, None).float()
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
        got = fm.fused_moe(x, gu, dn, None, None, shared=shared, router_logits=logits).float()  # dispatches here
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def test_route_from_logits_writes_the_reference_routing(device):
    """Ties go to the first expert, scores are sigmoid(logit) rounded to the logits' dtype."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, gate_up, down, logits, _ = _inputs(6, 64, 32, 5, device, 3, dtype)
    logits[2, 1] = logits[2, 3] = logits[2].max() + 1  # a tie between experts 1 and 3
    ids, scores = _route(logits, dtype)
    assert ids[2, 0].item() == 1
    want = fused_experts_torch(x, gate_up, down, ids, scores).float()
    got = moe_decode.fused_moe_decode(x, gate_up, down, None, None, None, None, None, None, None, logits).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("t", [1, 9])
def test_fp8_matches_fp8_reference_and_grouped_path(static, t, device, monkeypatch):
    """FP8 experts in the model's layout, static or dynamic activation scales: the decode kernels against the
    step-for-step FP8 reference and against the grouped-GEMM path of the same step."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    e, h, inter = 4, 256, 128
    x, gate_up, down, logits, shared = _inputs(t, h, inter, e, device, 31 + t, dtype)
    gs, ds = gate_up.float().abs().amax() / 448, down.float().abs().amax() / 448
    gu8, dn8 = _nk(quantize_fp8(gate_up, gs)), _nk(quantize_fp8(down, ds))
    a1 = x.float().abs().amax() / 448 if static else None
    a2 = torch.tensor(4.0 / 448, device=device) if static else None
    args = (gs.expand(e).contiguous(), ds.expand(e).contiguous(), a1, a2)
    ids, scores = _route(logits, dtype)
    want = shared.float() + fused_experts_fp8_torch(x, gu8, dn8, ids, scores, *args).float()
    got = fm.fused_moe(x, gu8, dn8, ids, scores, *args, shared=shared).float()
    with monkeypatch.context() as m:
        m.setattr(moe_decode, "DECODE_MAX_PAIRS", 0)  # the grouped GEMMs
        grouped = fm.fused_moe(x, gu8, dn8, ids, scores, *args, shared=shared).float()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert (got - want).norm() / want.norm() < tol
    assert (got - grouped).norm() / grouped.norm() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("launch", [None, "1", "4x64x2"])
def test_one_token_down_gemv(static, launch, device, monkeypatch):
    """A one-token FP8 step's routed down projection as the float16-product GEMV (the default; the decode GEMM
    still takes the gate-up; LLAMASERVE_MOE_DOWN_GEMV=0 puts the down back on it, 1 or a launch picks the GEMV's):
    against the step-for-step FP8 reference and the decode GEMM's result, with the shared output added and
    without; a malformed launch names itself. Two tokens keep the decode GEMM. The "4x64x2" launch runs as a PDL
    dependent too (LLAMASERVE_GEMV_PDL=1; where PDL runs, on Hopper GPUs)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    monkeypatch.setenv("LLAMASERVE_GEMV_PDL", "1" if launch == "4x64x2" else "0")
    e, h, inter = 4, 96, 320  # K = 320: not a multiple of the 64-wide slices
    x, gate_up, down, logits, shared = _inputs(1, h, inter, e, device, 7, dtype)
    gs, ds = gate_up.float().abs().amax() / 448, down.float().abs().amax() / 448
    gu8, dn8 = _nk(quantize_fp8(gate_up, gs)), _nk(quantize_fp8(down, ds))
    a1 = x.float().abs().amax() / 448 if static else None
    a2 = torch.tensor(4.0 / 448, device=device) if static else None
    args = (gs.expand(e).contiguous(), ds.expand(e).contiguous() * torch.arange(1.0, e + 1, device=device), a1, a2)
    ids, scores = _route(logits, dtype)
    gemm_calls = []
    real_gemm = moe_decode._gemm
    monkeypatch.setattr(moe_decode, "_gemm", lambda *a, **k: gemm_calls.append(a[5]) or real_gemm(*a, **k))
    for add in (shared, None):
        base = fused_experts_fp8_torch(x, gu8, dn8, ids, scores, *args).float()
        want = base + add.float() if add is not None else base
        monkeypatch.setenv("LLAMASERVE_MOE_DOWN_GEMV", "0")
        gemm_calls.clear()
        decode_gemm = fm.fused_moe(x, gu8, dn8, ids, scores, *args, shared=add).float()
        assert gemm_calls == [True, False]  # gate-up (GLU) and down on the decode GEMM
        if launch is None:
            monkeypatch.delenv("LLAMASERVE_MOE_DOWN_GEMV")
        else:
            monkeypatch.setenv("LLAMASERVE_MOE_DOWN_GEMV", launch)
        gemm_calls.clear()
        got = fm.fused_moe(x, gu8, dn8, ids, scores, *args, shared=add).float()
        assert gemm_calls == [True]  # the down went to the GEMV
        tol = 1e-3 if dtype == torch.float32 else 3e-2  # float16 sums of K / BLOCK_K products per lane
        assert (got - want).norm() / want.norm() < tol
        assert (got - decode_gemm).norm() / decode_gemm.norm() < tol
    x2, _, _, logits2, shared2 = _inputs(2, h, inter, e, device, 8, dtype)
    ids2, scores2 = _route(logits2, dtype)
    gemm_calls.clear()
    fm.fused_moe(x2, gu8, dn8, ids2, scores2, *args, shared=shared2)
    assert gemm_calls == [True, False]
    monkeypatch.setenv("LLAMASERVE_MOE_DOWN_GEMV", "8x1024")
    with pytest.raises(ValueError, match="LLAMASERVE_MOE_DOWN_GEMV='8x1024'"):
        fm.fused_moe(x, gu8, dn8, ids, scores, *args, shared=shared)
    monkeypatch.setenv("LLAMASERVE_MOE_DOWN_GEMV", "4x1x1")  # 320 slices of K = 320
    with pytest.raises(ValueError, match="LLAMASERVE_MOE_DOWN_GEMV: BLOCK_K = 1 cuts K = 320 into more than 300"):
        fm.fused_moe(x, gu8, dn8, ids, scores, *args, shared=shared)


def test_decode_config_override(monkeypatch):
    """LLAMASERVE_MOE_DECODE_GLU / _DOWN replace the launch parameters (then still fitted to shared memory); a
    malformed value names the variable and the expected form."""
    monkeypatch.setenv("LLAMASERVE_MOE_DECODE_DOWN", "32x256x8x3")
    assert moe_decode.decode_config(5120, 8192, False, 1, 1) == {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8,
                                                                 "num_stages": 3}
    assert moe_decode.decode_config(8192, 5120, True, 1, 1)["BLOCK_N"] == 32  # GLU keeps its defaults
    monkeypatch.setenv("LLAMASERVE_MOE_DECODE_GLU", "64x1024x4x8")
    c = moe_decode.decode_config(8192, 5120, True, 1, 1)
    assert c["BLOCK_N"] == 64 and c["num_stages"] * c["BLOCK_K"] * (16 + 2 * 64) <= moe_decode.SMEM_BYTES
    for bad in ("64x512x4", "64,512,4,4", "0x512x4x4"):
        monkeypatch.setenv("LLAMASERVE_MOE_DECODE_DOWN", bad)
        with pytest.raises(ValueError, match="LLAMASERVE_MOE_DECODE_DOWN=.*BLOCK_NxBLOCK_KxWARPSxSTAGES"):
            moe_decode.decode_config(5120, 8192, False, 1, 1)


def test_only_top1_decode_steps_take_this_path(device, monkeypatch):
    """Top-2 routing and steps above DECODE_MAX_PAIRS tokens stay on the grouped path."""
    calls = []
    monkeypatch.setattr(moe_decode, "fused_moe_decode", lambda *a: calls.append(a) or a[0])
    x, gate_up, down, logits, _ = _inputs(17, 32, 16, 3, device, 5, torch.float32)
    top_val, ids2 = logits.topk(2, dim=-1)
    fm.fused_moe(x[:4], gate_up, down, ids2[:4], torch.sigmoid(top_val[:4]))
    fm.fused_moe(x, gate_up, down, None, None, router_logits=logits)
    assert not calls
    fm.fused_moe(x[:16], gate_up, down, None, None, router_logits=logits[:16])
    assert len(calls) == 1


@pytest.mark.parametrize("t,h,e", [(1, 5120, 16), (7, 300, 5)])
def test_router_logits(t, h, e, device):
    """The router kernel against x @ W^T: float32 exactly up to summation order, bf16 within one rounding."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, h, generator=gen).to(device, dtype)
    w = (torch.randn(e, h, generator=gen) * h**-0.5).to(device, dtype)
    got = moe_decode.router_logits(x, w)
    want = (x.float() @ w.float().t())
    assert got.dtype == dtype and got.shape == (t, e)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("t,h,e,copy", [(1, 5120, 16, True), (3, 300, 5, False)])
def test_norm_router_matches_the_norm_and_router_kernels(t, h, e, copy, device):
    """The fused post-attention norm + router (`norm_router`) against `rms_norm` then `router_logits` and the
    reference RMSNorm: the same norm output, FP8 copy and new residual (the old one untouched), logits equal up to
    summation order."""
    from llamaserve.kernels.norm_act import rms_norm
    from llamaserve.layers.norm import RMSNorm

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(h + e)
    x = torch.randn(t, h, generator=gen).to(device, dtype)
    res = torch.randn(t, h, generator=gen).to(device, dtype)
    nw = (1 + 0.1 * torch.randn(h, generator=gen)).to(device, dtype)
    rw = (torch.randn(e, h, generator=gen) * h**-0.5).to(device, dtype)
    s8 = torch.tensor(0.01, device=device) if copy else None
    res_before = res.clone()
    y, y8, logits, new_res = moe_decode.norm_router(x, res, nw, 1e-5, rw, s8)
    assert torch.equal(res, res_before) and new_res.data_ptr() != res.data_ptr()
    want_res = res.clone()
    out = rms_norm(x, nw, 1e-5, want_res, fp8_copy=s8)
    want, want8 = out if copy else (out, None)
    ref = RMSNorm(h, 1e-5, dtype).to(device)
    ref.weight.data = nw
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref(x, res.clone())[0], atol=tol, rtol=tol)
    assert torch.equal(new_res, want_res) and logits.shape == (t, e) and logits.dtype == dtype
    torch.testing.assert_close(y, want, atol=tol, rtol=tol)
    torch.testing.assert_close(logits.float(), moe_decode.router_logits(want, rw).float(), atol=tol, rtol=tol)
    if copy:
        torch.testing.assert_close(y8.float(), want8.float(), atol=1e-3, rtol=0.125)
        assert (y8.float() == want8.float()).float().mean() > 0.99
    else:
        assert y8 is None


def test_decode_config_fits_shared_memory():
    """Every decode launch keeps its pipeline stages within SMEM_BYTES (FP8, bf16 and float32 operands)."""
    for n, k, glu in ((8192, 5120, True), (5120, 8192, False), (48, 64, True), (64, 4096, False)):
        for nbytes in (1, 2, 4):
            c = moe_decode.decode_config(n, k, glu, nbytes, nbytes)
            need = c["num_stages"] * c["BLOCK_K"] * (16 + (2 if glu else 1) * c["BLOCK_N"]) * nbytes
            assert need <= moe_decode.SMEM_BYTES and 16 <= c["BLOCK_K"] <= max(16, k), (n, k, nbytes, c)


@pytest.mark.parametrize("t", [3, 40])
def test_shared_output_as_a_callable(t, device):
    """The shared expert's output may come as a callable (layers/moe.py's stream join): both paths call it and
    give the same result as with the tensor itself."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, gate_up, down, logits, shared = _inputs(t, 64, 32, 4, device, 9 + t, dtype)
    calls = []
    want = fm.fused_moe(x, gate_up, down, None, None, shared=shared, router_logits=logits)
    got = fm.fused_moe(x, gate_up, down, None, None, shared=lambda: calls.append(1) or shared,
                       router_logits=logits)
    assert calls == [1] and torch.equal(got, want)


def _moe_module(device, dtype, quant=None):
    from transformers import Llama4TextConfig

    from llamaserve.layers.moe import Llama4MoE
    from llamaserve.models.llama import LlamaMLP

    cfg = Llama4TextConfig(hidden_size=256, intermediate_size=128, num_local_experts=4, num_experts_per_tok=1)
    moe = Llama4MoE(cfg, dtype, "triton", quant, "model.layers.0.feed_forward", LlamaMLP).to(device)
    gen = torch.Generator().manual_seed(0)
    for p in moe.parameters():
        if p.dtype == dtype:  # float weights (FP8 ones and scales are set by the test)
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(dtype))
    return moe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the second stream exists on CUDA only; the callable "
                    "join it uses is tested on every device above")
@pytest.mark.parametrize("routed_first", ["0", "1"])
def test_shared_expert_stream_matches_one_stream(routed_first, monkeypatch):
    """Llama4MoE at decode size with the shared expert on its own stream (eagerly and inside a CUDA graph) gives
    exactly the single-stream result."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    moe = _moe_module(device, dtype)
    x = torch.randn(4, 256, device=device, dtype=dtype)
    monkeypatch.setenv("LLAMASERVE_SHARED_EXPERT_STREAM", "0")
    want = moe(x)
    assert isinstance(moe(x, defer_shared=True), torch.Tensor)  # one stream: nothing to defer
    monkeypatch.setenv("LLAMASERVE_SHARED_EXPERT_STREAM", "1")
    monkeypatch.setenv("LLAMASERVE_MOE_ROUTED_FIRST", routed_first)  # the deferred path's capture order
    assert torch.equal(moe(x), want)
    assert torch.equal(moe(x, defer_shared=True).resolve(), want)
    static_x = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(static_x)
        deferred = moe(static_x, defer_shared=True)
        summed = deferred.resolve()
    for _ in range(3):
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want) and torch.equal(summed, want)


def test_expert_weight_scales_are_cached_until_a_loader_writes_one():
    """FusedExperts hands the kernels [E] scale vectors made once; loading a scale (ModelOpt's scalar or a
    per-expert vector, collapsed to its largest entry) makes them again."""
    from llamaserve.layers.moe import FusedExperts
    from llamaserve.layers.quantization import QuantConfig

    experts = FusedExperts(3, 32, 16, torch.float32, quant=QuantConfig("fp8"))
    gs, ds, _, _ = experts._scales()
    assert gs.shape == ds.shape == (3,) and torch.equal(gs, torch.ones(3))
    assert experts._scales()[0] is gs  # no new tensor (no copy kernel) per forward
    param = experts.gate_up_proj_weight_scale
    param.weight_loader(param, torch.tensor([0.5, 2.0, 1.5]))
    assert torch.equal(experts._scales()[0], torch.full((3,), 2.0))


@pytest.mark.parametrize("t", [1, 6])
def test_shared_expert_glu_kernel_matches_the_mlp(t, device):
    """Llama 4's FP8 shared expert at decode size (gate-up and SiLU in one kernel, `glu_decode`, then the down
    projection) against the shared expert module itself (FP8 GEMM, SiLU kernel, FP8 GEMM)."""
    from llamaserve.layers.quantization import QuantConfig

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    moe = _moe_module(device, dtype, QuantConfig("fp8"))
    gu, dn = moe.shared_expert.gate_up_proj, moe.shared_expert.down_proj
    gen = torch.Generator().manual_seed(t)
    with torch.no_grad():
        for lin in (gu, dn):
            w = torch.randn(lin.weight.shape, generator=gen) * lin.weight.shape[1] ** -0.5
            lin.weight_scale.fill_(w.abs().max().item() / 448)
            lin.weight.copy_(quantize_fp8(w.to(device), lin.weight_scale[0]))
            lin.input_scale.fill_(0.02)
            lin.finalize()
    x = torch.randn(t, 256, generator=gen).to(device, dtype)
    x8 = quantize_fp8(x, gu.input_scale)
    want = moe.shared_expert(x8).float()
    got = moe._shared(x8, x, decode=True).float()
    assert got.shape == want.shape == (t, 256)
    assert (got - want).norm() / want.norm() < (1e-2 if dtype == torch.float32 else 3e-2)
