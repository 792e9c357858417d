"""SwiGLU activation: silu(gate) * up on a fused [num_tokens, 2 * intermediate] input, optionally quantized to FP8
(`out_scale`) for the next linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.layers.quantization import quantize_fp8


class SiluAndMul(nn.Module):
    def __init__(self, backend: str = "torch") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.backend == "triton":
            from llamaserve.kernels.norm_act import silu_and_mul

            return silu_and_mul(x, out_scale)
        d = x.shape[-1] // 2
        y = F.silu(x[..., :d]) * x[..., d:]
        return y if out_scale is None else quantize_fp8(y, out_scale)
