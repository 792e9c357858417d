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
from llamaserve.layers.quantization import FP8, QuantConfig, dynamic_scale, quantize_fp8


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


def fused_experts_fp8_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor,
                            top_scores: torch.Tensor, gu_scale: torch.Tensor, dn_scale: torch.Tensor,
                            a1: torch.Tensor | None, a2: torch.Tensor | None) -> torch.Tensor:
    """Reference of the FP8 experts, step for step as kernels/fused_moe.py: the scaled token quantized per tensor
    (a1, or dynamic: amax(x) / 448, which bounds the score-scaled token since scores are at most 1), FP8 weights
    dequantized per expert, the SiLU-and-mul output quantized again (a2, or dynamic) before the down projection."""
    t, h = x.shape
    k = top_ids.shape[1]
    rows = x.repeat_interleave(k, dim=0) * top_scores.reshape(-1, 1).to(x.dtype)
    s1 = a1 if a1 is not None else dynamic_scale(x)
    rows = quantize_fp8(rows, s1).float() * s1
    inter = down.shape[1]
    flat = top_ids.reshape(-1)
    groups = [(e, (flat == e).nonzero(as_tuple=True)[0]) for e in flat.unique().tolist()]
    act = torch.zeros((t * k, inter), dtype=torch.float32, device=x.device)
    for e, sel in groups:
        gu = (rows[sel] @ (gate_up[e].float() * gu_scale[e])).to(x.dtype).float()
        act[sel] = (gu[:, inter:] * F.silu(gu[:, :inter])).to(x.dtype).float()
    s2 = a2 if a2 is not None else dynamic_scale(act)
    act = quantize_fp8(act, s2).float() * s2
    out = torch.zeros((t * k, h), dtype=torch.float32, device=x.device)
    for e, sel in groups:
        out[sel] = (act[sel] @ (down[e].float() * dn_scale[e])).to(x.dtype).float()
    return out.view(t, k, h).sum(dim=1).to(x.dtype)


class FusedExperts(nn.Module):
    """The routed experts' weights, fused as Llama 4 checkpoints store them: `gate_up_proj` [E, H, 2I] and
    `down_proj` [E, I, H]. FP8 (a QuantConfig that does not exclude them): float8_e4m3fn weights with one scale per
    tensor (`gate_up_proj_weight_scale`, `down_proj_weight_scale`, ModelOpt's fused-expert names), static input
    scales (`..._input_scale`) when the checkpoint has them, dynamic per-tensor otherwise (also for dummy
    weights: there is no calibration pass through the experts yet); a float checkpoint is quantized at load."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, backend: str = "torch",
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.backend, self.num_experts = backend, num_experts
        self.fp8 = quant is not None and not quant.excluded(prefix)
        wdtype = FP8 if self.fp8 else dtype
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inter, dtype=wdtype),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, hidden, dtype=wdtype), requires_grad=False)
        if self.fp8:
            static = quant.static_input_scales and not quant.online and not quant.dummy
            for name in ("gate_up_proj", "down_proj"):
                scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
                scale.weight_loader = self._scalar_loader
                setattr(self, f"{name}_weight_scale", scale)
                inp = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False) if static else None
                if inp is not None:
                    inp.weight_loader = self._scalar_loader
                setattr(self, f"{name}_input_scale", inp)
                getattr(self, name).weight_loader = self._make_weight_loader(name)

    @staticmethod
    def _scalar_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded.float().reshape(-1).max())  # a per-expert vector collapses to its largest entry

    def _make_weight_loader(self, name: str):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            if loaded.dtype != FP8:  # a float checkpoint: quantize with one scale per tensor
                scale = dynamic_scale(loaded)
                getattr(self, f"{name}_weight_scale").data.copy_(scale)
                loaded = quantize_fp8(loaded, scale)
            param.data.copy_(loaded)
        return load

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor) -> torch.Tensor:
        scales = ()
        if self.fp8:
            e = self.num_experts
            scales = (self.gate_up_proj_weight_scale.expand(e).contiguous(),
                      self.down_proj_weight_scale.expand(e).contiguous(), self.gate_up_proj_input_scale,
                      self.down_proj_input_scale)
        if self.backend == "triton":
            from llamaserve.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, top_ids, top_scores, *scales)
        reference = fused_experts_fp8_torch if self.fp8 else fused_experts_torch
        return reference(x, self.gate_up_proj, self.down_proj, top_ids, top_scores, *scales)


class Llama4MoE(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, backend: str, quant: QuantConfig | None, prefix: str,
                 mlp_cls: type) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; Llama 4 uses 'silu'")
        self.top_k = int(cfg.num_experts_per_tok)
        self.router = ReplicatedLinear(cfg.hidden_size, cfg.num_local_experts, False, dtype)  # never quantized
        self.experts = FusedExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, dtype, backend,
                                    quant, f"{prefix}.experts")
        self.shared_expert = mlp_cls(cfg, dtype, backend, quant, f"{prefix}.shared_expert",
                                     intermediate_size=cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)  # [T, E]
        top_val, top_ids = logits.topk(self.top_k, dim=-1)
        scores = torch.sigmoid(top_val.float()).to(x.dtype)
        routed = self.experts(x, top_ids, scores)
        return self.shared_expert(x) + routed
