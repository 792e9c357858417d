"""Fused MoE (grouped GEMMs over expert-sorted tokens) against the torch reference, bf16/fp32 and FP8 W8A8."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels import fused_moe as fm
from llamaserve.kernels.fused_moe import align_by_expert, fused_moe
from llamaserve.layers.moe import fused_experts_torch
from llamaserve.layers.quantization import FP8, quantize_fp8


def test_align_by_expert(device):
    top_ids = torch.tensor([[3], [0], [3], [3], [1], [0], [3]], device=device)
    pairs, block_expert = align_by_expert(top_ids, num_experts=5, block_m=2)
    n = top_ids.numel()
    blocks = pairs.view(-1, 2)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [p for p in blocks[b].tolist() if p < n]
        if e < 0:
            assert not rows
            continue
        assert rows and all(top_ids.view(-1)[p].item() == e for p in rows)
        seen += rows
    assert sorted(seen) == list(range(n))
    assert block_expert.tolist()[:4] == [0, 1, 3, 3]


def _inputs(t, h, inter, e, k, dtype, device, gen):
    x = torch.randn(t, h, generator=gen).to(device, dtype)
    gate_up = (torch.randn(e, h, 2 * inter, generator=gen) * h**-0.5).to(device, dtype)
    down = (torch.randn(e, inter, h, generator=gen) * inter**-0.5).to(device, dtype)
    logits = torch.randn(t, e, generator=gen).to(device)
    top_val, top_ids = logits.topk(k, dim=-1)
    return x, gate_up, down, top_ids, torch.sigmoid(top_val)


@pytest.mark.parametrize("t,k", [(1, 1), (37, 1), (20, 2)])
def test_matches_reference(t, k, device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(t * 10 + k)
    x, gate_up, down, top_ids, scores = _inputs(t, 64, 48, 6, k, dtype, device, gen)
    want = fused_experts_torch(x, gate_up, down, top_ids, scores)
    got = fused_moe(x, gate_up, down, top_ids, scores)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("static", [False, True])
def test_fp8_matches_dequantized_reference(static, device):
    """FP8 experts (one scale per expert) against the float reference on the dequantized weights: within the
    error FP8 activations add (a few percent of the output's scale)."""
    gen = torch.Generator().manual_seed(7)
    x, gate_up, down, top_ids, scores = _inputs(29, 64, 48, 4, 1, torch.float32, device, gen)
    gu_scale = gate_up.abs().amax(dim=(1, 2)) / 448
    dn_scale = down.abs().amax(dim=(1, 2)) / 448
    gu8 = torch.stack([quantize_fp8(gate_up[e], gu_scale[e]) for e in range(4)])
    dn8 = torch.stack([quantize_fp8(down[e], dn_scale[e]) for e in range(4)])
    assert gu8.dtype == FP8
    want = fused_experts_torch(x, gu8.float() * gu_scale[:, None, None], dn8.float() * dn_scale[:, None, None],
                               top_ids, scores)
    a1 = a2 = None
    if static:
        # calibrated the way ModelOpt does (amax / 448), with headroom for the activations
        a1, a2 = x.abs().amax() / 448, torch.tensor(16.0 / 448, device=device)
    xin = x.to(torch.bfloat16) if device.type == "cuda" else x
    got = fused_moe(xin, gu8, dn8, top_ids, scores, gu_scale, dn_scale, a1, a2).float()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.08, rel


@pytest.mark.parametrize("static", [False, True])
def test_fp8_kernel_matches_fp8_reference(static, device):
    """The kernel and the step-for-step FP8 reference (same quantization points) agree closely."""
    from llamaserve.layers.moe import fused_experts_fp8_torch

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    x, gate_up, down, top_ids, scores = _inputs(23, 64, 48, 4, 1, dtype, device, gen)
    gs, ds = gate_up.float().abs().amax() / 448, down.float().abs().amax() / 448
    gu8, dn8 = quantize_fp8(gate_up, gs), quantize_fp8(down, ds)
    a1 = x.float().abs().amax() / 448 if static else None
    a2 = torch.tensor(16.0 / 448, device=device) if static else None
    args = (gs.expand(4).contiguous(), ds.expand(4).contiguous(), a1, a2)
    want = fused_experts_fp8_torch(x, gu8, dn8, top_ids, scores, *args).float()
    got = fused_moe(x, gu8, dn8, top_ids, scores, *args).float()
    rel = (got - want).norm() / want.norm()
    assert rel < (1e-3 if dtype == torch.float32 else 3e-2), rel


@pytest.mark.parametrize("n,e,block_m", [(1, 16, 16), (7, 5, 2), (300, 16, 16), (64, 128, 16), (5000, 8, 64)])
def test_align_kernel_matches_torch(n, e, block_m, device):
    """The one-program alignment kernel (and the torch fallback above ALIGN_MAX_PAIRS) give the torch ops' result
    exactly: same pair order within an expert, same padding, same block experts."""
    from llamaserve.kernels.fused_moe import align_by_expert_torch

    gen = torch.Generator().manual_seed(n + e)
    ids = torch.randint(0, e, (n, 1), generator=gen).to(device)
    got = align_by_expert(ids, e, block_m)
    want = align_by_expert_torch(ids, e, block_m)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_route_top1(device):
    from llamaserve.kernels.fused_moe import align_by_expert_torch, route_top1

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(45, 16, generator=gen).to(device)
    ids, scores, pairs, blocks = route_top1(logits, 16)
    top_val, top_ids = logits.topk(1, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(scores, torch.sigmoid(top_val).reshape(-1))
    want = align_by_expert_torch(top_ids, 16, 16)
    assert torch.equal(pairs, want[0]) and torch.equal(blocks, want[1])


@pytest.mark.parametrize("k", [1, 2])
def test_split_k_shared_and_router_logits(k, device):
    """Shapes where the launch splits K in both GEMMs (float32 partials summed by the SiLU and reduce kernels), the
    shared expert's output added in the epilogue / the reduction, and top-1 routing from the logits."""
    from llamaserve.kernels.fused_moe import _launch

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t, h, inter, e = 3, 1024, 1024, 4
    assert _launch(t * k, 2 * inter, h, e)["SPLIT_K"] > 1 and _launch(t * k, h, inter, e)["SPLIT_K"] > 1
    gen = torch.Generator().manual_seed(5 + k)
    x, gate_up, down, top_ids, scores = _inputs(t, h, inter, e, k, dtype, device, gen)
    shared = torch.randn(t, h, generator=gen).to(device, dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    want = (shared.float() + fused_experts_torch(x, gate_up, down, top_ids, scores).float())
    got = fused_moe(x, gate_up, down, top_ids, scores, shared=shared).float()
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    if k == 1:
        logits = torch.randn(t, e, generator=gen).to(device, dtype)
        top_val, ids = logits.topk(1, dim=-1)
        want = fused_experts_torch(x, gate_up, down, ids, torch.sigmoid(top_val.float()).to(dtype)).float()
        got = fused_moe(x, gate_up, down, None, None, router_logits=logits).float()
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("static", [False, True])
def test_fp8_split_k_matches_fp8_reference(static, device):
    """FP8 with split-K and the shared expert added: the kernel against the step-for-step FP8 reference, with the
    weights in the [E, N, K] memory layout the model stores them in."""
    from llamaserve.layers.moe import fused_experts_fp8_torch

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(13)
    t, h, inter, e = 5, 1024, 1024, 4
    x, gate_up, down, top_ids, scores = _inputs(t, h, inter, e, 1, dtype, device, gen)
    gs, ds = gate_up.float().abs().amax() / 448, down.float().abs().amax() / 448
    gu8 = quantize_fp8(gate_up, gs).transpose(1, 2).contiguous().transpose(1, 2)
    dn8 = quantize_fp8(down, ds).transpose(1, 2).contiguous().transpose(1, 2)
    a1 = x.float().abs().amax() / 448 if static else None
    a2 = torch.tensor(4.0 / 448, device=device) if static else None
    args = (gs.expand(e).contiguous(), ds.expand(e).contiguous(), a1, a2)
    shared = torch.randn(t, h, generator=gen).to(device, dtype)
    want = shared.float() + fused_experts_fp8_torch(x, gu8, dn8, top_ids, scores, *args).float()
    got = fused_moe(x, gu8, dn8, top_ids, scores, *args, shared=shared).float()
    rel = (got - want).norm() / want.norm()
    assert rel < (1e-3 if dtype == torch.float32 else 3e-2), rel


@pytest.mark.parametrize("t,k", [(16, 1), (17, 1), (9, 2)])
def test_fp8_prequantized_pairs_match_in_kernel_quantization(t, k, device, monkeypatch):
    """Around PREQUANT_MIN_PAIRS the gate-up input switches from in-kernel quantization to one quantize pass over
    the pairs: both paths give the same result, and the step-for-step FP8 reference's (top-1 and top-2)."""
    from llamaserve.kernels import fused_moe as fm
    from llamaserve.layers.moe import fused_experts_fp8_torch

    assert (t * k >= fm.PREQUANT_MIN_PAIRS) == ((t, k) != (16, 1))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(17 * t + k)
    x, gate_up, down, top_ids, scores = _inputs(t, 128, 64, 4, k, dtype, device, gen)
    gs, ds = gate_up.float().abs().amax() / 448, down.float().abs().amax() / 448
    gu8, dn8 = quantize_fp8(gate_up, gs), quantize_fp8(down, ds)
    for a1, a2 in ((None, None), (x.float().abs().amax() / 448, torch.tensor(4.0 / 448, device=device))):
        args = (gs.expand(4).contiguous(), ds.expand(4).contiguous(), a1, a2)
        want = fused_experts_fp8_torch(x, gu8, dn8, top_ids, scores, *args).float()
        got = fused_moe(x, gu8, dn8, top_ids, scores, *args).float()
        with monkeypatch.context() as m:
            m.setattr(fm, "PREQUANT_MIN_PAIRS", 1 << 30)  # always in-kernel
            in_kernel = fused_moe(x, gu8, dn8, top_ids, scores, *args).float()
        # bf16: the FP8 roundings of near-tie values follow the bf16 products' rounding, a few percent overall
        tol = 1e-3 if dtype == torch.float32 else 6e-2
        assert (got - want).norm() / want.norm() < tol
        assert (got - in_kernel).norm() / in_kernel.norm() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_launch_fits_shared_memory():
    """Every launch the table picks keeps its pipeline stages within SMEM_BYTES, for FP8, bf16 and float32
    operands (bf16 experts at 64-row blocks asked for 384 KB before)."""
    from llamaserve.kernels.fused_moe import SMEM_BYTES, _launch

    for pairs in (1, 16, 64, 129, 512, 4096):
        for n, k in ((16384, 5120), (5120, 8192), (96, 64)):
            for a_bytes, w_bytes in ((1, 1), (2, 1), (2, 2), (4, 4)):
                c = _launch(pairs, n, k, 16, a_bytes, w_bytes)
                need = c["num_stages"] * c["BLOCK_K"] * (c["BLOCK_M"] * a_bytes + c["BLOCK_N"] * w_bytes)
                assert need <= SMEM_BYTES and c["BLOCK_K"] >= 16, (pairs, n, k, a_bytes, c)


def test_bf16_large_batch_blocks(device):
    """More than 128 pairs (64-row blocks, 128-wide N tiles): the float kernel still matches its reference."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(21)
    h, inter = (128, 64) if device.type == "cpu" else (1024, 512)
    x, gate_up, down, top_ids, scores = _inputs(150, h, inter, 3, 1, dtype, device, gen)
    want = fused_experts_torch(x, gate_up, down, top_ids, scores)
    got = fused_moe(x, gate_up, down, top_ids, scores)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("gate_up_launch,down_launch", [("32x32x2x2x1", "32x64x4x3x2"), ("64x16x4x4x4", "16x32x2x2x1")])
def test_launch_overrides(gate_up_launch, down_launch, device, monkeypatch):
    """LLAMASERVE_FUSED_MOE_GATE_UP / _DOWN (A/B switches for steps of more than 16 pairs) change the GEMMs' tiles,
    stages and split-K and keep the result: against the reference, top-1 (the down GEMM's direct or split path) and
    top-2; a malformed value or one whose stages overflow shared memory names itself."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    monkeypatch.setenv("LLAMASERVE_FUSED_MOE_GATE_UP", gate_up_launch)
    monkeypatch.setenv("LLAMASERVE_FUSED_MOE_DOWN", down_launch)
    configs = []
    real = fm._gemm
    monkeypatch.setattr(fm, "_gemm", lambda *a, **kw: configs.append(kw["config"]) or real(*a, **kw))
    for t, k in ((37, 1), (20, 2)):
        x, gate_up, down, top_ids, scores = _inputs(t, 64, 48, 6, k, dtype, device, gen)
        want = fused_experts_torch(x, gate_up, down, top_ids, scores)
        got = fused_moe(x, gate_up, down, top_ids, scores)
        torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)
    seen = ["x".join(str(c[f]) for f in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K")) for c in configs]
    assert seen == [gate_up_launch, down_launch] * 2
    monkeypatch.setenv("LLAMASERVE_FUSED_MOE_DOWN", "32x64x4")
    with pytest.raises(ValueError, match="LLAMASERVE_FUSED_MOE_DOWN='32x64x4'"):
        fused_moe(x, gate_up, down, top_ids, scores)
    monkeypatch.setenv("LLAMASERVE_FUSED_MOE_DOWN", "256x1024x4x8x1")
    with pytest.raises(ValueError, match="shared memory"):
        fused_moe(x, gate_up, down, top_ids, scores)
