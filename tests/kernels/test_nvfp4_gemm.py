"""Weight-only NVFP4 GEMM and grouped MoE kernels against their torch references (dequantize, then matmul), on
fresh random inputs. On the CPU they run under Triton's interpreter in float32 and float16 (the interpreter's
bf16 tl.dot is wrong in this Triton build, so bf16 runs only on CUDA)."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.nvfp4_gemm import gemm_tiles, nvfp4_fused_moe, nvfp4_gemm
from llamaserve.layers.moe_nvfp4 import nvfp4_experts_torch
from llamaserve.layers.nvfp4 import dequantize_nvfp4, nvfp4_linear_torch, quantize_nvfp4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_or_skip(dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA")


def _tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]


def _weights(shape: tuple[int, ...], gen: torch.Generator, device: torch.device):
    """Packed NVFP4 weights [..., N, K / 2] with global scales that differ per row (as fused shards do)."""
    w = torch.randn(*shape, generator=gen) * shape[-1] ** -0.5
    packed, scale, g = quantize_nvfp4(w)
    rows = g * (0.5 + torch.rand(shape[:-1], generator=gen))
    return packed.to(device), scale.to(device), rows.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (5, 40, 96), (16, 72, 160), (17, 33, 48), (70, 136, 224)])
def test_gemm_matches_reference(m, n, k, dtype, device):
    _dtype_or_skip(dtype, device)
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    packed, scale, g = _weights((n, k), gen, device)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if m % 2 else None
    got = nvfp4_gemm(x, packed, scale, g, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    want = nvfp4_linear_torch(x.float(), packed, scale, g, None if bias is None else bias.float())
    tol = _tol(dtype)
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_gemm_tiles_and_scalar_global_scale(device):
    """Both tile families, forced, on the same problem; a scalar global scale acts on every row."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 128, generator=gen)
    packed, scale, g = (t.to(device) for t in quantize_nvfp4(w))
    x = torch.randn(9, 128, generator=gen).to(device)
    want = x @ dequantize_nvfp4(packed, scale, g).t()
    for tiles in (gemm_tiles(1, 40, 128), gemm_tiles(64, 40, 128), (16, 16, 32, 4, 2)):
        torch.testing.assert_close(nvfp4_gemm(x, packed, scale, g, tiles=tiles), want, rtol=1e-5,
                                   atol=1e-5 * want.abs().max().item())
    with pytest.raises(ValueError, match="does not fit"):
        nvfp4_gemm(x[:, :96], packed, scale, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,block_m", [(1, 1, None), (37, 1, None), (20, 2, None), (45, 1, 64)])
def test_fused_moe_matches_reference(t, k, block_m, dtype, device):
    _dtype_or_skip(dtype, device)
    num_experts, hidden, inter = 5, 64, 48
    gen = torch.Generator().manual_seed(t * 10 + k)
    gate_up = _weights((num_experts, 2 * inter, hidden), gen, device)
    down = _weights((num_experts, hidden, inter), gen, device)
    x = torch.randn(t, hidden, generator=gen).to(device, dtype)
    top_val, top_ids = torch.randn(t, num_experts, generator=gen).to(device).topk(k, dim=-1)
    scores = torch.sigmoid(top_val)
    got = nvfp4_fused_moe(x, *gate_up, *down, top_ids, scores, block_m=block_m)
    assert got.dtype == dtype and got.shape == (t, hidden)
    want = nvfp4_experts_torch(x.float(), *gate_up, *down, top_ids, scores)
    tol = 2 * _tol(dtype)
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)
