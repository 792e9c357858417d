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
