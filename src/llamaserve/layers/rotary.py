"""Rotary position embedding (RoPE) with the `default`, `linear` and `llama3` frequency rules.

Llama checkpoints in Hugging Face layout rotate the two halves of each head ("neox" style, `rotate_half`).
The cos/sin table is built once for positions [0, max_position) in float32, exactly as transformers computes
its frequencies, so float32 outputs agree bit for bit with the reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict with 'rope_type') from a transformers 4.x or 5.x config."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    params.setdefault("rope_type", params.pop("type", "default"))
    return theta, params


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        if high == low:  # NOTE: no medium band; the smoothing formula would divide by zero
            return scaled
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type={rope_type!r} is not supported; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)  # [max_position, head_dim]
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, Hq * D]; k: [T, Hkv * D]. Returns rotated q, k of the same shapes."""
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        qh = q.view(q.shape[0], -1, self.head_dim)
        kh = k.view(k.shape[0], -1, self.head_dim)
        q_out = qh * cos + self._rotate_half(qh) * sin
        k_out = kh * cos + self._rotate_half(kh) * sin
        return q_out.reshape(q.shape), k_out.reshape(k.shape)
