"""Fused residual + RMSNorm and SiLU-and-mul kernels against their torch references, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.norm_act import rms_norm, silu_and_mul
from llamaserve.layers.activation import SiluAndMul
from llamaserve.layers.norm import RMSNorm


@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (33, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape, with_residual, device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t, n = shape
    ref = RMSNorm(n, 1e-5, dtype).to(device)
    ref.weight.data = torch.randn(n, dtype=dtype, device=device)
    x = torch.randn(t, n, dtype=dtype, device=device)
    res = torch.randn(t, n, dtype=dtype, device=device) if with_residual else None
    if with_residual:
        want, want_res = ref(x, res.clone())
        got_res = res.clone()
        got = rms_norm(x, ref.weight, 1e-5, got_res)
        torch.testing.assert_close(got_res, want_res)
    else:
        want = ref(x)
        got = rms_norm(x, ref.weight, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(1, 32), (5, 1536), (17, 3000)])
def test_silu_and_mul(shape, device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = torch.randn(shape[0], 2 * shape[1], dtype=dtype, device=device)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(silu_and_mul(x), SiluAndMul()(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_out(with_residual, device):
    """The FP8-quantizing variant equals the reference norm followed by quantize_fp8 (same scale, saturation)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t, n = 9, 576
    ref = RMSNorm(n, 1e-5, dtype).to(device)
    ref.weight.data = torch.randn(n, dtype=dtype, device=device)
    x = torch.randn(t, n, dtype=dtype, device=device)
    scale = torch.tensor(0.004, device=device)  # small enough that some values saturate at 448
    res = torch.randn(t, n, dtype=dtype, device=device) if with_residual else None
    if with_residual:
        want, _ = ref(x, res.clone(), out_scale=scale)
        got = rms_norm(x, ref.weight, 1e-5, res.clone(), out_scale=scale)
    else:
        want = ref(x, out_scale=scale)
        got = rms_norm(x, ref.weight, 1e-5, out_scale=scale)
    assert got.dtype == want.dtype == torch.float8_e4m3fn
    assert (want.float().abs() == 448).any(), "the test should exercise saturation"
    # one e4m3 step (12.5% relative) at most, from rounding the float32 input differently
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=0.125)
    if dtype == torch.float32:
        assert (got.float() == want.float()).float().mean() > 0.99


def _norm_pair(n, device):
    """The reference RMSNorm module and its Triton-backend twin with the same random weight, and their dtype."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ref = RMSNorm(n, 1e-5, dtype).to(device)
    ref.weight.data = torch.randn(n, dtype=dtype, device=device)
    kern = RMSNorm(n, 1e-5, dtype, backend="triton").to(device)
    kern.weight.data = ref.weight.data
    return ref, kern, dtype


@pytest.mark.parametrize("out_scale", [False, True])
def test_rms_norm_fp8_copy(out_scale, device):
    """A second, FP8 output (its own scale) next to the plain or FP8 one: kernel and reference module both give
    (output, quantize_fp8(norm, copy scale)), and the residual update is unchanged."""
    t, n = 6, 320
    ref, kern, dtype = _norm_pair(n, device)
    x = torch.randn(t, n, dtype=dtype, device=device)
    res = torch.randn(t, n, dtype=dtype, device=device)
    s_out = torch.tensor(0.01, device=device) if out_scale else None
    s_copy = torch.tensor(0.005, device=device)
    (want, want8), want_res = ref(x, res.clone(), out_scale=s_out, fp8_copy=s_copy)
    (got, got8), got_res = kern(x, res.clone(), out_scale=s_out, fp8_copy=s_copy)
    plain = ref(x, res.clone(), out_scale=s_out)[0]
    assert torch.equal(want.float(), plain.float()) and want8.dtype == got8.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(got_res, want_res)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3 if out_scale else tol,
                               rtol=0.125 if out_scale else tol)
    torch.testing.assert_close(got8.float(), want8.float(), atol=1e-3, rtol=0.125)
    exact = (ref(x, res.clone())[0].float() / s_copy).clamp(-448, 448)  # within half an e4m3 step
    torch.testing.assert_close(got8.float(), exact, atol=2**-9, rtol=0.0625 + (0 if dtype == torch.float32 else 0.02))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_adds_a_second_input(with_residual, device):
    """`add`: norm((x + add) + residual) with x + add rounded to x's dtype first, as the MoE's `shared + routed`
    followed by the layer's residual add; kernel against the reference module, residual update included."""
    t, n = 5, 448
    ref, kern, dtype = _norm_pair(n, device)
    x, add, res = (torch.randn(t, n, dtype=dtype, device=device) for _ in range(3))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if with_residual:
        want, want_res = ref(x + add, res.clone())
        got, got_res = kern(x, res.clone(), add=add)
        assert torch.equal(got_res, want_res) and torch.equal(ref(x, res.clone(), add=add)[0], want)
    else:
        want, got = ref(x + add), kern(x, add=add)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert (got - kern(x) if not with_residual else got - kern(x, res.clone())[0]).abs().max() > 0.1


def test_silu_and_mul_fp8_out(device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = 3 * torch.randn(13, 2 * 1536, dtype=dtype, device=device)
    scale = torch.tensor(0.02, device=device)
    got, want = silu_and_mul(x, scale), SiluAndMul()(x, scale)
    assert got.dtype == want.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=0.125)
    if dtype == torch.float32:
        assert (got.float() == want.float()).float().mean() > 0.99


def test_early_loads_change_no_byte(device, monkeypatch):
    """The norm kernels with the weight and scales loaded first (the default) and after the statistics
    (LLAMASERVE_EARLY_LOADS=0): the same bytes, for rms_norm (residual, addend, FP8 output and copy), the fused
    norm + router, and the decode MoE's routing kernel and GEMMs (their scales loaded before the weight loop) with
    static FP8 scales."""
    from llamaserve.kernels.moe_decode import fused_moe_decode, norm_router
    from llamaserve.layers.quantization import quantize_fp8

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    x, add, res = (torch.randn(3, 5120, generator=gen).to(device, dtype) for _ in range(3))
    w = (1 + 0.1 * torch.randn(5120, generator=gen)).to(device, dtype)
    rw = (torch.randn(16, 5120, generator=gen) * 0.01).to(device, dtype)
    s, s8 = torch.tensor(0.02, device=device), torch.tensor(0.03, device=device)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LLAMASERVE_EARLY_LOADS", flag)
        r = res.clone()
        y, y8 = rms_norm(x, w, 1e-5, r, out_scale=s, fp8_copy=s8, add=add)
        outs[flag] = [y.view(torch.uint8), y8.view(torch.uint8), r, *norm_router(x, res, w, 1e-5, rw, s8)]
        logits = outs[flag][-2]
        gu = quantize_fp8(torch.randn(16, 5120, 64, generator=torch.Generator().manual_seed(1)).to(device) * 0.02, s)
        dn = quantize_fp8(torch.randn(16, 32, 5120, generator=torch.Generator().manual_seed(2)).to(device) * 0.1, s)
        outs[flag].append(fused_moe_decode(x, gu, dn, None, None, s.expand(16).contiguous(), s.expand(16).contiguous(),
                                           s, s8, None, logits))
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
