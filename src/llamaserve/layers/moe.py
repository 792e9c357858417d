"""Mixture-of-experts feed-forward of Llama 4: a top-k sigmoid router, fused routed experts and a shared expert.

Router: logits = x W_r^T over the experts; each token takes its top-k experts (Llama 4: k = 1) with score
sigmoid(logit), and the expert sees the token already multiplied by its score (as transformers' Llama4TextMoe
does). Experts are stored fused, as the checkpoints store them: `gate_up_proj` [E, H, 2I] (gate = first I
columns) and `down_proj` [E, I, H]; expert e computes (silu(x G_e) * x U_e) D_e. The shared expert is a plain
SwiGLU MLP added to every token. `fused_experts_torch` is the reference (a loop over the experts that got
tokens, with a host sync); backend "triton" runs the grouped-GEMM kernel kernels/fused_moe.py (no host sync,
CUDA-graph safe).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.layers.linear import ReplicatedLinear
from llamaserve.layers.quantization import QuantConfig


def fused_experts_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor,
                        top_scores: torch.Tensor) -> torch.Tensor:
    """x [T, H]; gate_up [E, H, 2I]; down [E, I, H]; top_ids / top_scores [T, k] -> sum over k of
    expert_{id}(x * score), [T, H] in x's dtype."""
    t, h = x.shape
    inter = down.shape[1]
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    flat_ids = top_ids.reshape(-1)
    rows = torch.arange(t, device=x.device).repeat_interleave(top_ids.shape[1])
    scaled = x[rows] * top_scores.reshape(-1, 1).to(x.dtype)  # [T * k, H]
    for e in flat_ids.unique().tolist():
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        gu = scaled[sel] @ gate_up[e]  # [n, 2I]
        y = (gu[:, inter:] * F.silu(gu[:, :inter])) @ down[e]
        out.index_add_(0, rows[sel], y.float())
    return out.to(x.dtype)


class FusedExperts(nn.Module):
    """The routed experts' weights, fused as Llama 4 checkpoints store them."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, backend: str = "torch") -> None:
        super().__init__()
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inter, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from llamaserve.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, top_ids, top_scores)
        return fused_experts_torch(x, self.gate_up_proj, self.down_proj, top_ids, top_scores)


class Llama4MoE(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, backend: str, quant: QuantConfig | None, prefix: str,
                 mlp_cls: type) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; Llama 4 uses 'silu'")
        self.top_k = int(cfg.num_experts_per_tok)
        self.router = ReplicatedLinear(cfg.hidden_size, cfg.num_local_experts, False, dtype)  # never quantized
        self.experts = FusedExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, dtype, backend)
        self.shared_expert = mlp_cls(cfg, dtype, backend, quant, f"{prefix}.shared_expert",
                                     intermediate_size=cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)  # [T, E]
        top_val, top_ids = logits.topk(self.top_k, dim=-1)
        scores = torch.sigmoid(top_val.float()).to(x.dtype)
        routed = self.experts(x, top_ids, scores)
        return self.shared_expert(x) + routed
