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
    got = _pair(x, logits, _nk(gate_up), _nk(down), sgu, sdn).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def _pair(x, logits, gate_up, down, sgu, sdn, scales=None):
    """The pair kernels on inputs routed and quantized by `route_scale` (the norm + router kernel's job in the
    model)."""
    s1r, s1s = (scales[0], scales[1]) if scales is not None else (None, None)
    route = moe_pair.route_scale(x, logits, s1r)
    shared_in = quantize_fp8(x, s1s) if s1s is not None else x
    return moe_pair.moe_pair_decode(shared_in, route.a, route.ids, gate_up, down, sgu, sdn, x, scales)


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
    got = _pair(x, logits, _nk(gu8), _nk(dn8), sgu8, sdn8, scales).float()
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
    got = _pair(x, logits, _nk(gate_up), _nk(down), sgu, sdn).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    logits[0, 1] -= 1  # now expert 3 alone is largest: a different result
    assert not torch.allclose(_pair(x, logits, _nk(gate_up), _nk(down), sgu, sdn).float(), got)


def test_bad_arguments_and_launch_names(device, monkeypatch):
    x, logits, gate_up, down, sgu, sdn = _weights(64, 32, 4, device, 1, torch.float32)
    x2 = x.repeat(2, 1)
    with pytest.raises(ValueError, match="one token"):
        moe_pair.moe_pair_decode(x2, x2, torch.zeros(2, dtype=torch.int64), _nk(gate_up), _nk(down), sgu, sdn, x2)
    monkeypatch.setenv("LLAMASERVE_MOE_PAIR_DOWN", "8x1024")
    with pytest.raises(ValueError, match="LLAMASERVE_MOE_PAIR_DOWN=.*BLOCK_NxBLOCK_KxWARPS"):
        _pair(x, logits, _nk(gate_up), _nk(down), sgu, sdn)


@pytest.mark.parametrize("fp8", [False, True])
def test_norm_router_routes_like_the_routing_kernel(fp8, device):
    """norm_router(route=...): its last program per token writes the routing kernel's expert and x * score (FP8:
    the same bytes), beside the unchanged norm, logits and FP8 copy; the arrival counter is left at zero."""
    from llamaserve.kernels import moe_decode

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    x, res = (torch.randn(1, 320, generator=gen).to(device, dtype) for _ in range(2))
    nw = (1 + 0.1 * torch.randn(320, generator=gen)).to(device, dtype)
    rw = (torch.randn(16, 320, generator=gen) * 0.05).to(device, dtype)
    s_routed = torch.tensor(0.011, device=device) if fp8 else None
    s_copy = torch.tensor(0.013, device=device) if fp8 else None
    want = moe_decode.norm_router(x, res, nw, 1e-5, rw, s_copy)
    route = moe_decode.routing_buffers(x, s_routed)
    got = moe_decode.norm_router(x, res, nw, 1e-5, rw, s_copy, route)
    for a, b in zip(got, want):
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if fp8 and a.dtype != dtype else a,
                               b.view(torch.uint8) if fp8 and b.dtype != dtype else b)
    ref = moe_pair.route_scale(got[0], got[2], s_routed)
    assert route.ids.item() == ref.ids.item() == got[2].float().argmax().item()
    assert torch.equal(route.a.view(torch.uint8), ref.a.view(torch.uint8)) if fp8 else torch.equal(route.a, ref.a)
    assert int(route.counter.abs().sum()) == 0
    with pytest.raises(ValueError, match="route needs routing_buffers"):
        moe_decode.norm_router(x, res, nw, 1e-5, rw, s_copy, moe_decode.routing_buffers(x.repeat(2, 1), s_routed))


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
            v = (torch.randn(w.shape, generator=gen) * w.shape[1] ** -0.5).to(device)
            getattr(ex, f"{name}_weight_scale").fill_(v.abs().max().item() / 448)
            w.copy_(quantize_fp8(v, getattr(ex, f"{name}_weight_scale")))
        ex.gate_up_proj_input_scale.fill_(0.01)
        ex.down_proj_input_scale.fill_(0.003)
        for lin in (moe.shared_expert.gate_up_proj, moe.shared_expert.down_proj):
            v = (torch.randn(lin.weight.shape, generator=gen) * lin.weight.shape[1] ** -0.5).to(device)
            lin.weight_scale.fill_(v.abs().max().item() / 448)
            lin.weight.copy_(quantize_fp8(v, lin.weight_scale[0]))
            lin.input_scale.fill_(0.012)
            lin.finalize()
    return moe


def test_module_pair_path_agrees_with_the_two_chains(device, monkeypatch):
    """Llama4MoE.forward_pair (the norm's routing, then the pair kernels) agrees with the two-stream decode path
    (`forward`); `pair_ready` is off with LLAMASERVE_MOE_PAIR=0, while calibrating and for a dynamic shared down
    input."""
    from llamaserve.kernels import moe_decode
    from llamaserve.layers.moe import PendingSum

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    moe = _fp8_module(device, dtype)
    gen = torch.Generator().manual_seed(5)
    h, res = (torch.randn(1, 256, generator=gen).to(device, dtype) for _ in range(2))
    nw = torch.ones(256, device=device, dtype=dtype)
    assert moe.pair_ready(h)
    shared_scale, routed_scale = moe.pair_scales()
    route = moe_decode.routing_buffers(h, routed_scale)
    with torch.no_grad():
        x, x8, logits, _ = moe_decode.norm_router(h, res, nw, 1e-5, moe.router.weight, shared_scale, route)
        got = moe.forward_pair(x, x8, route)
        old = moe(x, shared_input=x8, defer_shared=True, logits=logits)
        want = (old.resolve() if isinstance(old, PendingSum) else old).float()
    assert got.shape == (1, 256)
    assert (got.float() - want).norm() / want.norm() < (1e-3 if dtype == torch.float32 else 2e-2)
    monkeypatch.setenv("LLAMASERVE_MOE_PAIR", "0")
    assert not moe.pair_ready(h)
    monkeypatch.delenv("LLAMASERVE_MOE_PAIR")
    assert moe.experts.begin_calibration()
    assert not moe.pair_ready(h)
    moe.experts.end_calibration()
    assert moe.pair_ready(h)
    moe.shared_expert.down_proj.input_scale = None  # a dynamic shared down input: not this path
    assert not moe.pair_ready(h)
