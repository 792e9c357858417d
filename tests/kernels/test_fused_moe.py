"""Fused MoE (grouped GEMMs over expert-sorted tokens) against the torch reference, bf16/fp32 and FP8 W8A8."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.fused_moe import align_by_expert, fused_moe
from llamaserve.layers.moe import fused_experts_torch
from llamaserve.layers.quantization import FP8, quantize_fp8


def test_align_by_expert():
    top_ids = torch.tensor([[3], [0], [3], [3], [1], [0], [3]])
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
