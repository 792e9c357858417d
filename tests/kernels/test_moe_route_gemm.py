"""Top-1 routing inside the routed gate-up GEMM (kernels/moe_route_gemm.py): the same bytes as the routing kernel
followed by the decode GEMM, for float and static-FP8 experts, tokens sharing experts, ties and ragged shapes."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels import moe_decode, moe_route_gemm
from llamaserve.layers.quantization import quantize_fp8
from tests.kernels.test_moe_decode import _inputs, _nk


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("t,h,inter,e", [(1, 256, 128, 16), (5, 96, 80, 3), (16, 128, 64, 4)])
def test_equals_route_kernel_then_gemm(t, h, inter, e, fp8, device, monkeypatch):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, gate_up, down, logits, shared = _inputs(t, h, inter, e, device, t * 11 + h, dtype)
    if t > 1:
        logits[1, 0] = logits[1, e - 1] = logits[1].max() + 1  # a tie: the first expert wins
    if fp8:
        gs, ds = gate_up.float().abs().amax() / 448, down.float().abs().amax() / 448
        gate_up, down = _nk(quantize_fp8(gate_up, gs)), _nk(quantize_fp8(down, ds))
        args = (gs.expand(e).contiguous(), ds.expand(e).contiguous(), x.float().abs().amax() / 448,
                torch.tensor(4.0 / 448, device=device))
    else:
        gate_up, down = _nk(gate_up), _nk(down)
        args = (None, None, None, None)
    calls = []
    real = moe_route_gemm.route_gate_up
    monkeypatch.setattr(moe_route_gemm, "route_gate_up", lambda *a: calls.append(1) or real(*a))
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LLAMASERVE_MOE_ROUTE_IN_GEMM", flag)
        outs[flag] = moe_decode.fused_moe_decode(x, gate_up, down, None, None, *args, shared, logits)
    assert calls == [1]
    assert torch.equal(outs["0"], outs["1"])
    if t > 4:
        assert logits.argmax(-1).unique().numel() < t  # tokens share experts: one program per expert streams it


def test_ids_and_scores(device):
    """The ids and scores it returns (read by the down projection) are the first largest logit and its sigmoid in
    the logits' dtype; the activation is silu(gate) * up of each token's expert."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t, h, inter, e = 6, 64, 32, 5
    x, gate_up, _, logits, _ = _inputs(t, h, inter, e, device, 5, dtype)
    logits[2, 1] = logits[2, 3] = logits[2].max() + 1
    act = torch.empty(t, inter, dtype=dtype, device=device)
    ids, scores = moe_route_gemm.route_gate_up(x, logits, _nk(gate_up), None, None, act, None)
    top, want_ids = logits.float().max(-1)
    assert ids.tolist() == want_ids.tolist() and ids[2].item() == 1
    torch.testing.assert_close(scores, torch.sigmoid(top).to(dtype).float())
    gu = (x * scores[:, None].to(dtype)).float()[:, None, :] @ gate_up[ids].float()  # [T, 1, 2I]
    gu = gu[:, 0].to(dtype).float()
    want = (torch.nn.functional.silu(gu[:, :inter]).to(dtype) * gu[:, inter:].to(dtype)).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(act.float(), want, atol=tol * want.abs().max().item(), rtol=tol)
    with pytest.raises(AssertionError, match="static input scale"):
        moe_route_gemm.route_gate_up(x, logits, quantize_fp8(gate_up, torch.tensor(1.0)), torch.ones(e), None, act,
                                     None)
