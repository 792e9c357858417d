"""Sampler: penalties, min_tokens, greedy / temperature / top-k / top-p / min-p, seeds, logprobs.

One row per request that samples this step, all rows processed together as tensors, with no host sync: every
branch is decided from the (host-side) sampling parameters, and parameter tensors reach the device through
pinned memory. Randomness is counter-based: the model runner gives each row a 31-bit `seed` derived from
(the request's seed, or the engine's RNG when it has none; the index of the token being sampled), so a seeded
request's tokens depend on nothing else in the batch and survive preemption. Backends: "triton" draws with the
Gumbel-max kernel (kernels/sampling.py, Philox in the kernel); "torch" (the reference) draws with the exponential
race argmax(p / Exp(1)) from a torch.Generator seeded per row. Both draw from softmax(logits / T) after the
filters; their random streams differ. Logprobs are of the raw model distribution (log_softmax of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamaserve.device_utils import h2d
from llamaserve.sampling_params import SamplingParams


def row_seed(seed: int, index: int) -> int:
    """The 31-bit seed of draw number `index` of a stream `seed` (splitmix-style integer mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) & 0x7FFFFFFF


@dataclass
class SamplingMetadata:
    params: list[SamplingParams]
    seeds: list[int]  # per row, from row_seed()
    output_token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    banned_token_ids: list[list[int]]  # EOS/stop ids while a request is below min_tokens


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] logprob of the sampled token
    ranks: torch.Tensor | None  # [B]
    top_ids: torch.Tensor | None  # [B, k_max]
    top_logprobs: torch.Tensor | None  # [B, k_max]


def _penalize(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    rows = [i for i, p in enumerate(md.params) if p.has_penalties]
    dev = logits.device
    for i in rows:
        p, row = md.params[i], logits[i]
        out_ids = h2d(md.output_token_ids[i], torch.long, dev)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros_like(row, dtype=torch.bool)
            seen[h2d(md.prompt_token_ids[i], torch.long, dev)] = True
            seen[out_ids] = True
            scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(seen, scaled, row)
        if out_ids.numel():
            counts = torch.zeros_like(row).scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=row.dtype))
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        logits[i] = row
    return logits


def _top_k_top_p_min_p(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    dev = logits.device
    vocab = logits.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in md.params]
    if any(k < vocab for k in ks) or any(p.top_p < 1.0 for p in md.params):
        top_k = h2d(ks, torch.long, dev)
        top_p = h2d([p.top_p for p in md.params], logits.dtype, dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first token always stays)
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, kept)
    if any(p.min_p > 0 for p in md.params):
        min_p = h2d([p.min_p for p in md.params], logits.dtype, dev)
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def _race_torch(logits: torch.Tensor, temps: list[float], seeds: list[int]) -> torch.Tensor:
    """Reference draw: argmax(p / Exp(1)) per row, noise from a generator seeded with the row's seed."""
    t = h2d(temps, logits.dtype, logits.device)
    probs = (logits / t[:, None]).softmax(dim=-1)
    noise = torch.empty_like(probs)
    for i, s in enumerate(seeds):
        noise[i].exponential_(generator=torch.Generator(device=logits.device).manual_seed(s))
    return (probs / noise).argmax(dim=-1)


class Sampler:
    def __init__(self, backend: str = "torch") -> None:
        self.backend = backend

    @staticmethod
    def plain_greedy(md: SamplingMetadata) -> bool:
        """Every row greedy, without logprobs, penalties or banned tokens: the argmax alone, which needs no
        float32 copy of the logits."""
        return (all(p.greedy and p.logprobs is None and not p.has_penalties for p in md.params)
                and not any(md.banned_token_ids))

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits: [B, vocab] in any float dtype (the model runner passes the lm_head's own) -> one token per row.
        A `plain_greedy` batch takes the argmax of them as they are (on CUDA with the Triton backend
        kernels/sampling.py's `greedy_argmax`); any other is cast to float32 first."""
        if self.plain_greedy(md):
            if self.backend == "triton" and logits.is_cuda:
                from llamaserve.kernels.sampling import greedy_argmax

                return SamplerOutput(greedy_argmax(logits), None, None, None, None)
            return SamplerOutput(logits.argmax(dim=-1), None, None, None, None)
        logits = logits.float()
        k_max = max((p.logprobs for p in md.params if p.logprobs is not None), default=None)
        raw_logprobs = logits.log_softmax(dim=-1) if k_max is not None else None
        if any(md.banned_token_ids) or any(p.has_penalties for p in md.params):
            logits = _penalize(logits.clone(), md)
            for i, banned in enumerate(md.banned_token_ids):
                if banned:
                    logits[i, h2d(banned, torch.long, logits.device)] = float("-inf")
        greedy = [p.greedy for p in md.params]
        if all(greedy):
            sampled = logits.argmax(dim=-1)
        else:
            temps = [0.0 if g else p.temperature for g, p in zip(greedy, md.params)]
            filtered = _top_k_top_p_min_p(logits, md)
            if self.backend == "triton":
                from llamaserve.kernels.sampling import gumbel_argmax

                sampled = gumbel_argmax(filtered.contiguous(), h2d(temps, torch.float32, logits.device),
                                        h2d(md.seeds, torch.int32, logits.device))
            else:
                drawn = _race_torch(filtered, [t if t > 0 else 1.0 for t in temps], md.seeds)
                sampled = torch.where(h2d(greedy, torch.bool, logits.device), logits.argmax(dim=-1), drawn)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None, None)
        chosen = raw_logprobs.gather(1, sampled[:, None])
        ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
        top_lp, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max > 0 else (None, None)
        return SamplerOutput(sampled, chosen.squeeze(1), ranks, top_ids, top_lp)
