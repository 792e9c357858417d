"""The small-batch FP8 matmul kernel against the dequantize-and-matmul reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.fp8_gemv import fp8_gemv
from llamaserve.layers.quantization import dynamic_scale, quantize_fp8, reference_fp8_linear


@pytest.mark.parametrize("m,n,k", [(1, 96, 512), (5, 200, 1536), (16, 64, 700), (3, 17, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(m, n, k, bias, device):
    out_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device) * 0.05
    sx, sw = dynamic_scale(x), dynamic_scale(w)
    xq, wq = quantize_fp8(x, sx), quantize_fp8(w, sw)
    b = torch.randn(n, device=device, dtype=out_dtype) if bias else None
    want = reference_fp8_linear(xq, sx, wq, sw, b, torch.float32)
    got = fp8_gemv(xq, sx, wq, sw, b, out_dtype, block_k=256 if k < 1024 else 512)
    assert got.dtype == out_dtype and got.shape == (m, n)
    tol = 1e-4 if out_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_rejects_large_batches():
    with pytest.raises(ValueError, match="16 rows"):
        fp8_gemv(torch.zeros(17, 32).to(torch.float8_e4m3fn), torch.ones(()), torch.zeros(8, 32).to(
            torch.float8_e4m3fn), torch.ones(()), None, torch.float32)
