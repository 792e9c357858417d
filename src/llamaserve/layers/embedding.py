"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.layers.linear import _copy, _tp


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = _tp()
        self.num_embeddings = num_embeddings
        self.per_rank = (num_embeddings + self.tp_size - 1) // self.tp_size
        self.vocab_start = self.tp_rank * self.per_rank
        self.vocab_end = min(num_embeddings, self.vocab_start + self.per_rank)
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        shard = loaded[self.vocab_start : self.vocab_end]
        param.data.zero_()
        _copy(param.data[: shard.shape[0]], shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden]."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mask, self.weight) * mask.unsqueeze(-1)
        torch.distributed.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The LM head: with the Triton backend on CUDA, one row (a batch-1 decode step) takes the GEMV of
    kernels/gemv.py, which streams the weight faster than cuBLAS's one-row GEMM; more rows take F.linear.
    LLAMASERVE_LM_HEAD_GEMV=0 turns the GEMV off, =BLOCK_NxBLOCK_KxWARPS sets its launch (sweeps)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, backend: str = "torch") -> None:
        super().__init__(num_embeddings, embedding_dim, dtype)
        self.backend = backend

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] (gathered over ranks, padding dropped)."""
        logits = self._gemv(hidden) if self.backend == "triton" and hidden.is_cuda else None
        if logits is None:
            logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.num_embeddings]

    def _gemv(self, hidden: torch.Tensor) -> torch.Tensor | None:
        from llamaserve.kernels import gemv, launch_from_env

        if os.environ.get("LLAMASERVE_LM_HEAD_GEMV") == "0" or hidden.shape[0] != 1 or hidden.stride(-1) != 1:
            return None
        launch = launch_from_env("LLAMASERVE_LM_HEAD_GEMV", (gemv.BLOCK_N, gemv.BLOCK_K, gemv.NUM_WARPS),
                                 gemv.LAUNCH_FIELDS)
        return gemv.gemv(hidden, self.weight, *launch)
