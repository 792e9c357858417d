"""The input RMSNorm inside the qkv GEMM (kernels/norm_gemm.py) against `rms_norm` then the layer's GEMM."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels import norm_gemm
from llamaserve.kernels.moe_decode import SMEM_BYTES
from llamaserve.kernels.norm_act import rms_norm
from llamaserve.layers.norm import RMSNorm
from llamaserve.layers.quantization import FP8, dynamic_scale, quantize_fp8


def _case(t, k, n, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen).to(device, dtype)
    add = torch.randn(t, k, generator=gen).to(device, dtype)
    res = torch.randn(t, k, generator=gen).to(device, dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=gen)).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device, dtype)
    return x, add, res, nw, w


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("t,k,n,with_add,with_res", [(1, 5120, 96, True, True), (3, 300, 70, False, True),
                                                   (4, 256, 64, True, True), (2, 128, 48, False, False)])
def test_matches_norm_then_gemm(t, k, n, with_add, with_res, fp8, device):
    """Ragged and even K / N, 1-4 rows, with and without the pending shared-expert addend and the residual; float
    weights, and FP8 weights with a static input scale: the output is the GEMM over `rms_norm`'s output (for FP8
    its FP8 bytes) up to summation order, the new residual is `rms_norm`'s x + add + residual exactly, and the
    residual passed in is untouched."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, add, res, nw, w = _case(t, k, n, device, dtype, seed=t * k + n)
    add = add if with_add else None
    res = res if with_res else None
    res_before = res.clone() if res is not None else None
    if fp8:
        ws = dynamic_scale(w)
        wq = quantize_fp8(w, ws)
        s = torch.tensor(0.01, device=device)
        y, new_res = norm_gemm.norm_linear(x, res, add, nw, 1e-5, wq, ws, s, dtype)
    else:
        y, new_res = norm_gemm.norm_linear(x, res, add, nw, 1e-5, w, None, None, dtype)
    want_res = res.clone() if res is not None else None
    a = rms_norm(x, nw, 1e-5, want_res, out_scale=s if fp8 else None, add=add)
    if fp8:
        want = (a.float() * s) @ (wq.float() * ws).t()
    else:
        want = a.float() @ w.float().t()
    assert y.shape == (t, n) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), want, atol=tol, rtol=tol)
    if res is not None:
        assert torch.equal(res, res_before) and new_res.data_ptr() != res.data_ptr()
        assert torch.equal(new_res, want_res)
    elif add is None:
        assert new_res is x
    # and against the torch reference norm, not only the Triton one
    ref = RMSNorm(k, 1e-5, dtype).to(device)
    ref.weight.data = nw
    xin = x + add if add is not None else x
    ref_out = ref(xin, res_before.clone())[0] if res is not None else ref(xin)
    ref_y = (quantize_fp8(ref_out, s).float() * s) @ (wq.float() * ws).t() if fp8 else ref_out.float() @ w.float().t()
    torch.testing.assert_close(y.float(), ref_y, atol=0.05 if fp8 else tol, rtol=0.05 if fp8 else tol)


def test_no_residual_adds_the_pending_part(device):
    """Without a residual, x + add is both the normalized input and the returned residual."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, add, _, nw, w = _case(2, 200, 40, device, dtype, seed=3)
    y, new_res = norm_gemm.norm_linear(x, None, add, nw, 1e-5, w, None, None, dtype)
    torch.testing.assert_close(new_res, x + add)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 output: one rounding of the result
    torch.testing.assert_close(y.float(), rms_norm(x + add, nw, 1e-5).float() @ w.float().t(), atol=tol, rtol=tol)


def test_config_override_and_limits(monkeypatch):
    """LLAMASERVE_NORM_QKV_CONFIG sets the launch (stages fit in shared memory); a malformed value names itself;
    more rows than MAX_ROWS or mixed scale arguments are refused."""
    monkeypatch.setenv("LLAMASERVE_NORM_QKV_CONFIG", "64x512x8x6")
    cfg = norm_gemm.norm_gemm_config(5120, 1, 1)
    assert (cfg["BLOCK_N"], cfg["num_warps"]) == (64, 8)
    assert cfg["num_stages"] * cfg["BLOCK_K"] * (16 + 64) <= SMEM_BYTES and cfg["BLOCK_K"] <= 512
    monkeypatch.setenv("LLAMASERVE_NORM_QKV_CONFIG", "64x512")
    with pytest.raises(ValueError, match="LLAMASERVE_NORM_QKV_CONFIG"):
        norm_gemm.norm_gemm_config(5120, 1, 1)
    monkeypatch.delenv("LLAMASERVE_NORM_QKV_CONFIG")
    x = torch.zeros(norm_gemm.MAX_ROWS + 1, 64)
    with pytest.raises(AssertionError):
        norm_gemm.norm_linear(x, None, None, torch.ones(64), 1e-5, torch.zeros(32, 64), None, None, x.dtype)
    with pytest.raises(AssertionError, match="both scales"):
        norm_gemm.norm_linear(x[:1], None, None, torch.ones(64), 1e-5, torch.zeros(32, 64).to(FP8), None, None,
                              x.dtype)
