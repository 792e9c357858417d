"""The Gumbel-max sampling kernel: greedy rows are argmax, seeded draws repeat, and draws follow softmax(l / T)
(chi-square against the exact probabilities, like the torch reference sampler on the same logits)."""

from __future__ import annotations

import random

import pytest
import torch

from llamaserve.kernels.sampling import fill_sampled, greedy_argmax, gumbel_argmax
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


@pytest.mark.parametrize("b,v", [(1, 202048), (3, 5000), (2, 4096), (5, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_argmax_is_torch_argmax(b, v, dtype, device):
    """The split argmax gives torch.argmax's index on fresh random logits of the lm_head's dtypes, ragged and
    exact multiples of the chunk, with ties inside a chunk and across chunks going to the lowest id."""
    gen = torch.Generator().manual_seed(b * v)
    logits = torch.randn(b, v, generator=gen).to(device, dtype)
    assert torch.equal(greedy_argmax(logits), logits.float().argmax(-1))
    top = logits.max() + 1
    logits[0, v - 1] = logits[0, v // 2] = top  # tie across chunks (and inside the one chunk of a short row)
    if b > 1:
        logits[1, 3] = logits[1, 9] = top  # tie inside a chunk
    got = greedy_argmax(logits)
    assert got[0].item() == v // 2 and (b == 1 or got[1].item() == 3)
    assert torch.equal(got, logits.float().argmax(-1))
    wide = torch.full((b, v + 40), float(top) + 5, device=device, dtype=dtype)  # a padded vocabulary's columns
    wide[:, :v] = logits
    assert torch.equal(greedy_argmax(wide[:, :v]), got)  # a row-strided view reads only its own columns


def test_plain_greedy_batches_skip_the_float_copy(device):
    """A batch of greedy rows without logprobs, penalties or bans is sampled from the lm_head's dtype as it is
    (the same tokens as from float32); any of those features takes the float32 path."""
    logits = torch.randn(4, 3000, device=device).to(torch.bfloat16)

    def md(params, banned=None):
        return SamplingMetadata(params, [1] * len(params), [[5]] * len(params), [[1]] * len(params),
                                banned or [[] for _ in params])
    plain = md([SamplingParams(temperature=0)] * 4)
    assert Sampler.plain_greedy(plain)
    for backend in ("torch", "triton"):
        assert torch.equal(Sampler(backend)(logits, plain).sampled, logits.float().argmax(-1))
    assert not Sampler.plain_greedy(md([SamplingParams(temperature=0, logprobs=2)] * 4))
    assert not Sampler.plain_greedy(md([SamplingParams(temperature=0, presence_penalty=0.5)] * 4))
    assert not Sampler.plain_greedy(md([SamplingParams(temperature=0)] * 4, banned=[[7], [], [], []]))
    assert not Sampler.plain_greedy(md([SamplingParams(temperature=0)] * 3 + [SamplingParams(temperature=0.8)]))
    out = Sampler("torch")(logits, md([SamplingParams(temperature=0, logprobs=2)] * 4))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32


def test_fill_sampled_matches_torch(device):
    """ids[t] = sampled[rows[t]] where rows[t] >= 0, the other ids untouched, as the torch expression it replaces."""
    for n in (1, 5, 16, 37):
        ids = torch.randint(0, 1000, (n,), device=device)
        rows = torch.randint(-1, 8, (n,), device=device)
        sampled = torch.randint(0, 1000, (8,), device=device)
        want = torch.where(rows >= 0, sampled[rows.clamp(min=0)], ids)
        fill_sampled(ids, rows, sampled)
        assert torch.equal(ids, want)
