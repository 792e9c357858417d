"""RMSNorm, optionally fused with the residual add and an FP8 quantize of its output (`out_scale`): the torch
reference, or the Triton kernel (backend "triton")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamaserve.layers.quantization import quantize_fp8


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, backend: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                fp8_copy: torch.Tensor | None = None, add: torch.Tensor | None = None) -> Any:
        """x: [num_tokens, hidden]. With `residual`, returns (norm(x + residual), x + residual).
        With `out_scale`, the normalized output is float8_e4m3fn (value / out_scale). With `fp8_copy` (a scale),
        the normalized output is a pair: (output, output quantized to FP8 with that scale). With `add`, x + add
        (in x's dtype) takes x's place (Llama 4's shared-expert output, added here instead of by the MoE)."""
        if self.backend == "triton":
            from llamaserve.kernels.norm_act import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps, out_scale=out_scale, fp8_copy=fp8_copy, add=add)
            residual = residual.clone() if residual.data_ptr() == x.data_ptr() else residual
            return rms_norm(x, self.weight, self.eps, residual, out_scale, fp8_copy, add), residual
        if add is not None:
            x = x + add
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        # NOTE: same op order as transformers' LlamaRMSNorm, so float32 results agree bit for bit.
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * h.to(dtype)
        out = quantize_fp8(y, out_scale) if out_scale is not None else y
        if fp8_copy is not None:
            out = (out, quantize_fp8(y, fp8_copy))
        return out if residual is None else (out, residual)
