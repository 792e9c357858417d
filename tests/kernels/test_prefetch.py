"""kernels/prefetch.py: the L2 prefetch reads every word of the weight (its XOR checksum matches torch's)."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.prefetch import l2_checksum, prefetch_l2


def _xor(words: torch.Tensor) -> int:
    out = 0
    for v in words.tolist():
        out ^= v
    return out


@pytest.mark.parametrize("shape,block", [((300, 64), 1024), ((5, 7, 8), 16), ((1000, 37, 4), 4096)])
def test_checksum_covers_every_word(shape, block, device):
    gen = torch.Generator().manual_seed(block)
    w = torch.randint(-128, 127, shape, generator=gen, dtype=torch.int8).to(device).view(torch.float8_e4m3fn)
    sink = l2_checksum(w, block)
    assert sink.shape == (-(-w.numel() // (4 * block)),)
    words = w.reshape(-1).view(torch.int32).cpu().clone()
    assert _xor(sink.cpu()) == _xor(words)
    w.view(torch.int8).reshape(-1)[-1] += 1  # the last word counts too
    assert _xor(l2_checksum(w, block).cpu()) != _xor(words)


def test_prefetch_is_off_by_default_and_off_the_gpu(device, monkeypatch):
    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn, device=device)
    monkeypatch.delenv("LLAMASERVE_L2_PREFETCH", raising=False)
    assert prefetch_l2(w) is None
    monkeypatch.setenv("LLAMASERVE_L2_PREFETCH", "1")
    join = prefetch_l2(w)
    assert (join is None) == (device.type != "cuda")
    if join is not None:
        join()
        torch.cuda.synchronize()
