"""kernels/norm_gemv.py (a one-token input RMSNorm, FP8 quantize and FP8 GEMV in one kernel) against its reference
(the torch RMSNorm with FP8 output, then the float32 GEMV) on fresh random inputs: hidden sizes that are and are not
multiples of the K slice, row counts that are not multiples of the program's rows, with and without the second
addend, 0-2 weight slices loaded before the statistics."""

from __future__ import annotations

import random

import pytest
import torch

from llamaserve.kernels.norm_gemv import norm_gemv, norm_gemv_torch, norm_qkv_mode, norm_qkv_pre
from llamaserve.layers.quantization import quantize_fp8


def _inputs(n, k, has_add, device, dtype):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(1, k, generator=gen).to(device, dtype)
    add = torch.randn(1, k, generator=gen).to(device, dtype) if has_add else None
    residual = (4 * torch.randn(1, k, generator=gen)).to(device, dtype)
    norm_weight = (1 + 0.3 * torch.randn(k, generator=gen)).to(device, dtype)
    w = torch.randn(n, k, generator=gen).to(device)
    w_scale = w.abs().amax() / 448
    x_scale = torch.tensor(4.0 / 448, device=device)  # |normalized x| reaches a few units
    return x, add, residual, norm_weight, x_scale, quantize_fp8(w, w_scale), w_scale


@pytest.mark.parametrize("n,k,launch", [(50, 320, (8, 128, 4)), (64, 512, (16, 256, 4)), (24, 96, (8, 32, 2))])
@pytest.mark.parametrize("has_add", [False, True])
@pytest.mark.parametrize("pre", [0, 1, 2])
def test_norm_gemv_matches_reference(n, k, launch, has_add, pre, device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # the interpreter's bf16 sums are broken
    x, add, residual, nw, sx, w8, sw = _inputs(n, k, has_add, device, dtype)
    before = residual.clone()
    y, new_residual = norm_gemv(x, add, residual, nw, 1e-5, sx, w8, sw, dtype, launch, pre)
    want_y, want_residual = norm_gemv_torch(x, add, before, nw, 1e-5, sx, w8, sw, dtype)
    assert torch.equal(residual, before)  # read only: the next residual is a new tensor
    assert torch.equal(new_residual, want_residual)
    assert y.shape == (1, n) and y.dtype == dtype
    # float16 products and the sum of squares in another order: rare one-step FP8 differences of an input value,
    # bf16 rounding of the output
    scale = want_y.float().abs().mean()
    torch.testing.assert_close(y.float(), want_y.float(), rtol=2e-2, atol=2e-2 * scale.item())


def test_norm_gemv_bad_inputs_and_mode(device, monkeypatch):
    x, add, residual, nw, sx, w8, sw = _inputs(16, 64, True, device, torch.float32)
    with pytest.raises(ValueError, match="one row"):
        norm_gemv(x.expand(2, -1), None, residual.expand(2, -1), nw, 1e-5, sx, w8, sw, x.dtype, (8, 32, 2))
    with pytest.raises(ValueError, match="pre = 3"):
        norm_gemv(x, add, residual, nw, 1e-5, sx, w8, sw, x.dtype, (8, 32, 2), pre=3)
    monkeypatch.setenv("LLAMASERVE_NORM_QKV_GEMV", "yes")
    with pytest.raises(ValueError, match="LLAMASERVE_NORM_QKV_GEMV='yes'"):
        norm_qkv_mode()
    monkeypatch.setenv("LLAMASERVE_NORM_QKV_GEMV", "trigger")
    assert norm_qkv_mode() == "trigger"
    monkeypatch.setenv("LLAMASERVE_NORM_QKV_PRE", "3")
    with pytest.raises(ValueError, match="LLAMASERVE_NORM_QKV_PRE='3'"):
        norm_qkv_pre()
