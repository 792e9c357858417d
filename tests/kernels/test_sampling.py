"""The Gumbel-max sampling kernel: greedy rows are argmax, seeded draws repeat, and draws follow softmax(l / T)
(chi-square against the exact probabilities, like the torch reference sampler on the same logits)."""

from __future__ import annotations

import random

import pytest
import torch

from llamaserve.kernels.sampling import gumbel_argmax
from llamaserve.layers.sampler import Sampler, SamplingMetadata
from llamaserve.sampling_params import SamplingParams


def test_greedy_rows_and_masks(device):
    logits = torch.randn(6, 3000, device=device)
    logits[1, :] = float("-inf")
    logits[1, 17] = 0.0  # one allowed token
    temp = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 2.0], device=device)
    seeds = torch.randint(0, 2**31 - 1, (6,), dtype=torch.int32, device=device)
    out = gumbel_argmax(logits, temp, seeds)
    want = logits.argmax(-1)
    assert out[[0, 2, 4]].tolist() == want[[0, 2, 4]].tolist()
    assert out[1].item() == 17
    assert torch.equal(gumbel_argmax(logits, temp, seeds), out)  # the same seeds draw the same tokens


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_draws_follow_softmax(backend, device):
    n, temperature = 3000, 0.8
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -0.5, 0.2], device=device)
    probs = (logits / temperature).softmax(-1).cpu()
    base = random.randrange(2**20)
    seeds = [base + i for i in range(n)]
    if backend == "triton":
        out = gumbel_argmax(logits.expand(n, -1).contiguous(), torch.full((n,), temperature, device=device),
                            torch.tensor(seeds, dtype=torch.int32, device=device))
    else:
        md = SamplingMetadata([SamplingParams(temperature=temperature)] * n, seeds, [[]] * n, [[0]] * n, [[]] * n)
        out = Sampler("torch")(logits.expand(n, -1).clone(), md).sampled
    counts = torch.bincount(out.cpu(), minlength=8).float()
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001
    assert _chi2(counts, probs) < 24.3, counts.tolist()
