"""RMSNorm, optionally fused with the residual add and an FP8 quantize of its output (`out_scale`): the torch
reference, or the Triton kernel (backend "triton")."""

from __future__ import annotations

import torch
from torch import nn

from llamaserve.layers.quantization import quantize_fp8


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, backend: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, hidden]. With `residual`, returns (norm(x + residual), x + residual).
        With `out_scale`, the normalized output is float8_e4m3fn (value / out_scale)."""
        if self.backend == "triton":
            from llamaserve.kernels.norm_act import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps, out_scale=out_scale)
            residual = residual.clone() if residual.data_ptr() == x.data_ptr() else residual
            return rms_norm(x, self.weight, self.eps, residual, out_scale), residual
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        # NOTE: same op order as transformers' LlamaRMSNorm, so float32 results agree bit for bit.
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        if out_scale is not None:
            out = quantize_fp8(out, out_scale)
        return out if residual is None else (out, residual)
