"""`stage_inputs` (a decode step's inputs, staging -> CUDA-graph inputs, placeholders from `sampled`) against its
torch reference on fresh random inputs, for graph sizes from 1 to past one program's block."""

from __future__ import annotations

import pytest
import torch

from llamaserve.kernels.step_inputs import BLOCK, stage_inputs, stage_inputs_torch


@pytest.mark.parametrize("bs,max_blocks", [(1, 144), (4, 3), (16, 9), (300, 1)])
def test_stage_inputs_matches_torch(bs, max_blocks, device):
    n = bs * (5 + max_blocks)
    src = torch.randint(0, 10_000, (n,), device=device)
    src[4 * bs : 5 * bs] = torch.randint(-1, 6, (bs,), device=device)  # sampled-row index: -1 = a known token
    sampled = torch.randint(0, 10_000, (6,), device=device)
    dst = torch.full((n + 5,), -3, dtype=torch.long, device=device)  # the graph buffer is the largest size's
    want = dst.clone()
    stage_inputs_torch(src, want, sampled, bs)
    stage_inputs(src, dst, sampled, bs)
    assert torch.equal(dst, want)
    assert dst[n:].tolist() == [-3] * 5  # nothing past this size's inputs
    rows = src[4 * bs : 5 * bs]
    took = rows >= 0
    assert torch.equal(dst[:bs][took], sampled[rows[took]]) and torch.equal(dst[:bs][~took], src[:bs][~took])
    assert torch.equal(dst[bs:n], src[bs:])
    if bs == 300:
        assert n > BLOCK  # several programs
