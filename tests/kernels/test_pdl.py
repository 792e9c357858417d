"""Programmatic dependent launch (kernels/pdl.py): when the short decode kernels launch as programmatic
dependents, and (on a Hopper GPU) that they give the same bytes as ordinary launches, eagerly and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels import pdl

PDL_ON = {"PDL": True, "launch_pdl": True}


def test_pdl_args_only_where_the_device_can(monkeypatch):
    """On by default on compute capability 9.0+ outside the interpreter; off with LLAMASERVE_PDL=0, on older GPUs,
    on the CPU and under TRITON_INTERPRET=1."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LLAMASERVE_PDL", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if pdl.gdc_wait is None:  # a Triton without griddepcontrol never launches so
        assert pdl.pdl_args(cuda) == {}
        return
    assert pdl.pdl_args(cuda) == PDL_ON
    assert pdl.pdl_args(torch.device("cpu")) == {}
    monkeypatch.setenv("LLAMASERVE_PDL", "0")
    assert pdl.pdl_args(cuda) == {}
    monkeypatch.setenv("LLAMASERVE_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_args(cuda) == {}
    monkeypatch.delenv("TRITON_INTERPRET")
    assert pdl.trigger_early(cuda)  # an early trigger needs what PDL needs
    monkeypatch.setenv("LLAMASERVE_PDL_TRIGGER", "0")
    assert not pdl.trigger_early(cuda)
    monkeypatch.delenv("LLAMASERVE_PDL_TRIGGER")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert pdl.pdl_args(cuda) == {}
    assert not pdl.trigger_early(cuda)
    assert not pdl.trigger_early(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper+ GPU; the launch decision is tested above")
def test_pdl_kernels_match_ordinary_launches(monkeypatch):
    """A chain norm -> norm + router -> routing -> MoE GEMMs (the down triggers its dependent early) -> norm, each
    short kernel a programmatic dependent of the one before, gives exactly the bytes of ordinary launches, eagerly
    and replayed from a CUDA graph."""
    from llamaserve.kernels import moe_decode
    from llamaserve.kernels.norm_act import rms_norm

    assert pdl.pdl_args(torch.device("cuda")) == PDL_ON
    gen = torch.Generator().manual_seed(5)
    h, e = 5120, 16
    x = torch.randn(2, h, generator=gen).cuda().bfloat16()
    res = torch.randn(2, h, generator=gen).cuda().bfloat16()
    nw = (1 + 0.1 * torch.randn(h, generator=gen)).cuda().bfloat16()
    rw = (torch.randn(e, h, generator=gen) * h**-0.5).cuda().bfloat16()
    gu = (torch.randn(e, 64, h, generator=gen) * h**-0.5).cuda().bfloat16().transpose(1, 2)
    dn = (torch.randn(e, h, 32, generator=gen) * 32**-0.5).cuda().bfloat16().transpose(1, 2)

    def chain():
        r = res.clone()
        y = rms_norm(x, nw, 1e-5, r)
        y2, _, logits, new_r = moe_decode.norm_router(y, r, nw, 1e-5, rw, None)
        out = moe_decode.fused_moe_decode(y2, gu, dn, None, None, None, None, None, None, None, logits)
        after_down = rms_norm(out, nw, 1e-5, new_r.clone())  # launched early by the triggering down GEMM
        return torch.cat([after_down, logits.repeat(1, h // e)])

    monkeypatch.setenv("LLAMASERVE_PDL", "0")
    want = chain()
    monkeypatch.setenv("LLAMASERVE_PDL", "1")
    assert torch.equal(chain(), want)
    chain()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
