"""Sampler: penalties, min_tokens, greedy / temperature / top-k / top-p / min-p, seeds, logprobs.

One row per request that samples this step. All rows are processed together as tensors; only the random draw
loops over seeded rows, each with its own `torch.Generator`, so a seeded request's tokens do not depend on
what else is in the batch. Sampling uses the exponential race (argmax of p / Exp(1)), which equals drawing from
the categorical distribution p. Logprobs are of the raw model distribution (log_softmax of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamaserve.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # per row; None -> the engine's shared generator
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
    rows = [i for i, p in enumerate(md.params)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    for i in rows:
        p, row = md.params[i], logits[i]
        out_ids = torch.tensor(md.output_token_ids[i], dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros_like(row, dtype=torch.bool)
            seen[torch.tensor(md.prompt_token_ids[i], dtype=torch.long, device=logits.device)] = True
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
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in md.params], device=dev)
    top_p = torch.tensor([p.top_p for p in md.params], device=dev, dtype=logits.dtype)
    min_p = torch.tensor([p.min_p for p in md.params], device=dev, dtype=logits.dtype)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first token always stays)
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, kept)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits: [B, vocab] float32 -> one token per row."""
        k_max = max((p.logprobs for p in md.params if p.logprobs is not None), default=None)
        raw_logprobs = logits.log_softmax(dim=-1) if k_max is not None else None
        logits = _penalize(logits.clone(), md)
        for i, banned in enumerate(md.banned_token_ids):
            if banned:
                logits[i, banned] = float("-inf")
        greedy = torch.tensor([p.greedy for p in md.params], device=logits.device)
        sampled = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            temps = torch.tensor([1.0 if p.greedy else p.temperature for p in md.params], device=logits.device)
            probs = _top_k_top_p_min_p(logits / temps[:, None], md).softmax(dim=-1)
            noise = torch.empty_like(probs)
            shared = [i for i, g in enumerate(md.generators) if g is None]
            if shared:
                noise[shared] = torch.empty((len(shared), probs.shape[1]), device=probs.device).exponential_(
                    generator=self.generator)
            for i, g in enumerate(md.generators):
                if g is not None:
                    noise[i].exponential_(generator=g)
            sampled = torch.where(greedy, sampled, (probs / noise).argmax(dim=-1))
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None, None)
        chosen = raw_logprobs.gather(1, sampled[:, None])
        ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
        top_lp, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max > 0 else (None, None)
        return SamplerOutput(sampled, chosen.squeeze(1), ranks, top_ids, top_lp)
