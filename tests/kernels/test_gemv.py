"""The LM head's GEMV (kernels/gemv.py) against its float32 reference on fresh random inputs: vocabularies and hidden
sizes that are and are not multiples of the launch's blocks, a row of a larger batch, bf16 and float32."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.gemv import BLOCK_K, BLOCK_N, gemv, gemv_torch


@pytest.mark.parametrize("n,k", [(4 * BLOCK_N, 2 * BLOCK_K), (1000, 576), (37, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_matches_reference(n, k, dtype, device):
    gen = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=gen).to(device, dtype)
    hidden = torch.randn(3, k, generator=gen).to(device, dtype)
    x = hidden[1:2]  # a row of a larger tensor, as the model runner passes it
    y = gemv(x, w)
    want = gemv_torch(x, w)
    assert y.shape == (1, n) and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    else:  # float32 sums in another order, both rounded to bf16: at most a rounding step apart
        torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_gemv_launch_overrides_and_bad_shapes(device):
    w = torch.randn(300, 256, device=device)
    x = torch.randn(1, 256, device=device)
    for block_n, block_k, warps in ((16, 512, 4), (32, 128, 2)):
        torch.testing.assert_close(gemv(x, w, block_n, block_k, warps), gemv_torch(x, w), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 256, device=device), w)
    with pytest.raises(ValueError, match="K-contiguous"):
        gemv(x, w.t().contiguous().t())


def test_lm_head_takes_the_gemv_for_one_row_only(monkeypatch, device):
    """ParallelLMHead: one row with the Triton backend on CUDA goes to the GEMV, anything else (more rows, the torch
    backend, LLAMASERVE_LM_HEAD_GEMV=0) to F.linear; a malformed override names itself."""
    from llamaserve.layers.embedding import ParallelLMHead

    head = ParallelLMHead(100, 64, torch.float32, backend="triton").to(device)
    head.weight.data.normal_()
    h = torch.randn(2, 64, device=device)
    assert (head._gemv(h[:1]) is not None) and head._gemv(h) is None
    torch.testing.assert_close(head._gemv(h[:1]), gemv_torch(h[:1], head.weight), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(head.compute_logits(h), h @ head.weight.t())
    monkeypatch.setenv("LLAMASERVE_LM_HEAD_GEMV", "0")
    assert head._gemv(h[:1]) is None
    monkeypatch.setenv("LLAMASERVE_LM_HEAD_GEMV", "64x256")
    with pytest.raises(ValueError, match="LLAMASERVE_LM_HEAD_GEMV='64x256'"):
        head._gemv(h[:1])


@pytest.mark.parametrize("n,k", [(4 * BLOCK_N, 2 * BLOCK_K), (300, 320)])
def test_gemv_fp8_with_scales(n, k, device):
    """FP8 weight and input with per-tensor scales (a one-token FP8 linear): the float32 sums times both scales."""
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * 0.5).to(device).to(torch.float8_e4m3fn)
    x = torch.randn(1, k, generator=gen).to(device).to(torch.float8_e4m3fn)
    sx, sw = torch.tensor(0.02, device=device), torch.tensor(0.003, device=device)
    y = gemv(x, w, x_scale=sx, w_scale=sw, out_dtype=torch.bfloat16)
    want = gemv_torch(x, w, sx, sw, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-4)
    with pytest.raises(ValueError, match="both x_scale and w_scale"):
        gemv(x, w, x_scale=sx)


@pytest.mark.parametrize("n,k,launch", [(300, 320, (8, 128, 4)), (64, 5120, (8, 1024, 4)), (37, 1000, (4, 256, 2))])
def test_gemv_fp8_half_products(n, k, launch, device):
    """The FP8 form with float16 products (`half=True`, the one-token FP8 linears' default): close to the float32
    reference on fresh random inputs, K a multiple of the slice or not."""
    gen = torch.Generator().manual_seed(7 * n + k)
    w = (torch.randn(n, k, generator=gen) * 40).clamp(-448, 448).to(device).to(torch.float8_e4m3fn)
    x = (torch.randn(1, k, generator=gen) * 60).clamp(-448, 448).to(device).to(torch.float8_e4m3fn)
    sx, sw = torch.tensor(0.02, device=device), torch.tensor(0.003, device=device)
    y = gemv(x, w, *launch, x_scale=sx, w_scale=sw, out_dtype=torch.float32, half=True)
    want = gemv_torch(x, w, sx, sw, torch.float32)
    scale = want.abs().max()
    assert (y - want).abs().max() <= 2e-3 * scale, float((y - want).abs().max() / scale)


def test_gemv_fp8_half_extremes_do_not_overflow(device):
    """Every value at FP8's largest (448): each float16 lane sums K / BLOCK_K products of 448 * 448 * 2**-10; the
    result is exact. A float32 or bf16 operand is refused in this form."""
    k = 8192
    w = torch.full((16, k), 448.0, device=device).to(torch.float8_e4m3fn)
    x = torch.full((1, k), -448.0, device=device).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0, device=device)
    y = gemv(x, w, 8, 256, 4, x_scale=one, w_scale=one, out_dtype=torch.float32, half=True)
    assert torch.isfinite(y).all() and torch.equal(y, torch.full_like(y, -448.0 * 448.0 * k))
    with pytest.raises(ValueError, match="half=True takes FP8"):
        gemv(torch.randn(1, 64, device=device), torch.randn(8, 64, device=device), half=True)
    with pytest.raises(ValueError, match="K = 8192, block_k = 16 .*LLAMASERVE_FP8_GEMV_HALF=0"):
        gemv(x, w, 8, 16, 4, x_scale=one, w_scale=one, half=True)  # 512 slices: float16 sums could overflow
