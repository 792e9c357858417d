"""One-token Llama 4 MoE in two launches (kernels/moe_pair.py): against the torch references, the two-stream
decode path and the module's own switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaserve.kernels import moe_pair
from llamaserve.layers.moe import fused_experts_fp8_torch, fused_experts_torch
from llamaserve.layers.quantization import QuantConfig, quantize_fp8, reference_fp8_linear


def _nk(w):
    """The [E, N, K] (K-contiguous) memory layout the model stores expert weights in."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _weights(h, inter, e, device, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h, generator=gen).to(device, dtype)
    logits = torch.randn(1, e, generator=gen).to(device, dtype)
    gate_up = (torch.randn(e, h, 2 * inter, generator=gen) * h**-0.5).to(device, dtype)
    down = (torch.randn(e, inter, h, generator=gen) * inter**-0.5).to(device, dtype)
    sgu = (torch.randn(2 * inter, h, generator=gen) * h**-0.5).to(device, dtype)
    sdn = (torch.randn(h, inter, generator=gen) * inter**-0.5).to(device, dtype)
    return x, logits, gate_up, down, sgu, sdn


def _route(logits, dtype):
    top_val, ids = logits.topk(1, dim=-1)
    return ids, torch.sigmoid(top_val.float()).to(dtype)


def _silu_mul(g, inter):
    return F.silu(g[:, :inter]) * g[:, inter:]


@pytest.mark.parametrize("h,inter,e,launch", [(256, 128, 4, None), (96, 80, 3, "4x64x2"), (160, 48, 16, "8x32x4")])
def test_float_matches_reference(h, inter, e, launch, device, monkeypatch):
    """Float weights, even and ragged shapes (rows and K not multiples of the launch's blocks): shared + routed
    as the reference computes them."""
    if launch:
        monkeypatch.setenv("LLAMASERVE_MOE_PAIR_GLU", launch)
        monkeypatch.setenv("LLAMASERVE_MOE_PAIR_DOWN", launch)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, logits, gate_up, down, sgu, sdn = _weights(h, inter, e, device, h + e, dtype)
    ids, scores = _route(logits, dtype)
    routed = fused_experts_torch(x, gate_up, down, ids, scores)
    shared = _silu_mul(x @ sgu.t(), inter) @ sdn.t()
    want = (shared + routed).float()
    got = moe_pair.moe_pair_decode(x, logits, _nk(gate_up), _nk(down), sgu, sdn).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def _fp8_case(h, inter, e, device, seed, dtype):
    x, logits, gate_up, down, sgu, sdn = _weights(h, inter, e, device, seed, dtype)
    amax = [w.float().abs().amax() / 448 for w in (gate_up, down, sgu, sdn)]
    gu8, dn8, sgu8, sdn8 = (quantize_fp8(w, s) for w, s in zip((gate_up, down, sgu, sdn), amax))
    s1r = (x.float().abs().amax() * 0.9 / 448).reshape(())  # x * score <= x: some headroom unused
    s1s = (x.float().abs().amax() / 448).reshape(())
    s2r, s2s = torch.tensor(3.0 / 448, device=device), torch.tensor(2.0 / 448, device=device)
    scales = (s1r, s1s, amax[0].expand(e).contiguous(), amax[2], s2r, s2s, amax[1].expand(e).contiguous(), amax[3])
    return x, logits, (gu8, dn8, sgu8, sdn8), scales


def _fp8_reference(x, logits, weights, scales, inter, dtype):
    gu8, dn8, sgu8, sdn8 = weights
    s1r, s1s, gs, wss, s2r, s2s, ds, wds = scales
    ids, scores = _route(logits, dtype)
    routed = fused_experts_fp8_torch(x, gu8, dn8, ids, scores, gs, ds, s1r, s2r)
    g = reference_fp8_linear(quantize_fp8(x, s1s), s1s, sgu8, wss, None, dtype)
    shared = reference_fp8_linear(quantize_fp8(_silu_mul(g, inter), s2s), s2s, sdn8, wds, None, dtype)
    return shared + routed


@pytest.mark.parametrize("h,inter,e", [(256, 128, 4), (320, 96, 16)])
def test_fp8_matches_fp8_reference(h, inter, e, device):
    """FP8 weights, static input scales: the step-for-step FP8 reference (x * score rounded, quantized, GEMM,
    SiLU and product in the model dtype, quantized, GEMM) for both experts."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, logits, (gu8, dn8, sgu8, sdn8), scales = _fp8_case(h, inter, e, device, 7 * e, dtype)
    want = _fp8_reference(x, logits, (gu8, dn8, sgu8, sdn8), scales, inter, dtype).float()
    got = moe_pair.moe_pair_decode(x, logits, _nk(gu8), _nk(dn8), sgu8, sdn8, scales).float()
    assert got.shape == (1, h)
    assert (got - want).norm() / want.norm() < (1e-3 if dtype == torch.float32 else 2e-2)


def test_routing_ties_go_to_the_first_expert(device):
    """Two equal largest logits: expert 1, not 3 (as topk and the two-stream routing kernel choose)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, logits, gate_up, down, sgu, sdn = _weights(64, 32, 5, device, 3, dtype)
    logits[0, 1] = logits[0, 3] = logits[0].max() + 1
    ids, scores = _route(logits, dtype)
    assert ids.item() == 1
    want = (_silu_mul(x @ sgu.t(), 32) @ sdn.t() + fused_experts_torch(x, gate_up, down, ids, scores)).float()
    got = moe_pair.moe_pair_decode(x, logits, _nk(gate_up), _nk(down), sgu, sdn).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    logits[0, 1] -= 1  # now expert 3 alone is largest: a different result
    assert not torch.allclose(moe_pair.moe_pair_decode(x, logits, _nk(gate_up), _nk(down), sgu, sdn).float(), got)


def test_bad_arguments_and_launch_names(device, monkeypatch):
    x, logits, gate_up, down, sgu, sdn = _weights(64, 32, 4, device, 1, torch.float32)
    with pytest.raises(ValueError, match="one token"):
        moe_pair.moe_pair_decode(x.repeat(2, 1), logits.repeat(2, 1), _nk(gate_up), _nk(down), sgu, sdn)
    monkeypatch.setenv("LLAMASERVE_MOE_PAIR_DOWN", "8x1024")
    with pytest.raises(ValueError, match="LLAMASERVE_MOE_PAIR_DOWN=.*BLOCK_NxBLOCK_KxWARPS"):
        moe_pair.moe_pair_decode(x, logits, _nk(gate_up), _nk(down), sgu, sdn)


def _fp8_module(device, dtype):
    """A small Llama4MoE with FP8 routed and shared experts and static input scales."""
    from transformers import Llama4TextConfig

    from llamaserve.layers.moe import Llama4MoE
    from llamaserve.models.llama import LlamaMLP

    cfg = Llama4TextConfig(hidden_size=256, intermediate_size=128, num_local_experts=4, num_experts_per_tok=1)
    moe = Llama4MoE(cfg, dtype, "triton", QuantConfig("fp8"), "model.layers.0.feed_forward", LlamaMLP).to(device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.router.weight.copy_((torch.randn(moe.router.weight.shape, generator=gen) * 0.05).to(dtype))
        ex = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(ex, name)
            v = torch.randn(w.shape, generator=gen) * w.shape[1] ** -0.5
            getattr(ex, f"{name}_weight_scale").fill_(v.abs().max().item() / 448)
            w.copy_(quantize_fp8(v, getattr(ex, f"{name}_weight_scale")).to(device))
        ex.gate_up_proj_input_scale.fill_(0.01)
        ex.down_proj_input_scale.fill_(0.003)
        for lin in (moe.shared_expert.gate_up_proj, moe.shared_expert.down_proj):
            v = torch.randn(lin.weight.shape, generator=gen) * lin.weight.shape[1] ** -0.5
            lin.weight_scale.fill_(v.abs().max().item() / 448)
            lin.weight.copy_(quantize_fp8(v.to(device), lin.weight_scale[0]))
            lin.input_scale.fill_(0.012)
            lin.finalize()
    return moe


def test_module_one_token_takes_the_pair_path_and_agrees(device, monkeypatch):
    """Llama4MoE at one token runs the pair kernels (a plain tensor, not the two chains' PendingSum) and agrees
    with the two-stream decode path (LLAMASERVE_MOE_PAIR=0); two tokens, calibration and the switch keep the old
    path."""
    from llamaserve.layers.moe import PendingSum
    from llamaserve.layers.quantization import quantize_fp8 as q

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    moe = _fp8_module(device, dtype)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    x8 = q(x, moe.shared_expert.gate_up_proj.input_scale)
    assert moe.pair_ready(x)
    calls = []
    real = moe_pair.moe_pair_decode
    monkeypatch.setattr(moe_pair, "moe_pair_decode", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        got = moe(x, shared_input=x8, defer_shared=True)
        assert isinstance(got, torch.Tensor) and got.shape == (1, 256) and len(calls) == 1
        moe(x.repeat(2, 1), shared_input=x8.repeat(2, 1), defer_shared=True)  # two tokens: the old path
        assert len(calls) == 1
        monkeypatch.setenv("LLAMASERVE_MOE_PAIR", "0")
        assert not moe.pair_ready(x)
        old = moe(x, shared_input=x8, defer_shared=True)
        assert len(calls) == 1
        want = (old.resolve() if isinstance(old, PendingSum) else old).float()
    assert (got.float() - want).norm() / want.norm() < (1e-3 if dtype == torch.float32 else 2e-2)
    monkeypatch.delenv("LLAMASERVE_MOE_PAIR")
    assert moe.experts.begin_calibration()
    assert not moe.pair_ready(x)
    moe.experts.end_calibration()
    assert moe.pair_ready(x)
    moe.shared_expert.down_proj.input_scale = None  # a dynamic shared down input: not this path
    assert not moe.pair_ready(x)
