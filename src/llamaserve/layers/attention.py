"""Attention over the paged KV cache, and `ForwardBatch`, the one description of a step a model sees.

The KV cache of a layer is `kv_cache`: [2, num_slots, num_kv_heads, head_dim], num_slots = num_blocks *
block_size, in the cache dtype (model dtype, bf16, or float8_e4m3fn with per-layer scales `k_scale`/`v_scale`:
stored = value / scale). Token t of a step is written to slot `slot_mapping[t]`; request i reads its context
through `block_tables[i]`. A step mixes prefills, prefill chunks and decodes: request i contributes
`query_lens[i]` new tokens at the end of a context of `seq_lens[i]` tokens (causal within the context).

Backends: "torch" (the reference, any device) is here; "triton" runs kernels/paged_attention.py, and
`forward_qkv` (RoPE + KV write + attention from the fused QKV output) runs kernels/rope_kv.py first, with the
output quantized to FP8 in the attention kernel when o_proj takes a static-scaled FP8 input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llamaserve.kernels.paged_attention import RopeInputs


@dataclass
class ForwardBatch:
    """Tensors and host-side lists for one model step; built by the model runner."""

    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, KV slot each new token is written to
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int64
    seq_lens: torch.Tensor  # [num_reqs] context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_reqs + 1] cu_seqlens_q
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    block_size: int
    cache: dict = field(default_factory=dict)  # per-step values derived once and shared by the layers

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


def _as_storage(x: torch.Tensor) -> torch.Tensor:
    # NOTE: index_put is not implemented for float8 on every device; byte views work everywhere.
    return x.view(torch.uint8) if x.dtype.itemsize == 1 else x


def write_kv_torch(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float, v_scale: float) -> None:
    """k, v: [T, Hkv, D] -> kv_cache[0/1, slot_mapping]."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        k = (k.float() / k_scale).clamp(-fmax, fmax)
        v = (v.float() / v_scale).clamp(-fmax, fmax)
    storage = _as_storage(kv_cache)
    storage[0, slot_mapping] = _as_storage(k.to(kv_cache.dtype))
    storage[1, slot_mapping] = _as_storage(v.to(kv_cache.dtype))


def read_kv_torch(kv_cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, k_scale: float,
                  v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather [len(slots), Hkv, D] keys and values in `dtype`, dequantized."""
    kv = _as_storage(kv_cache)[:, slots].view(kv_cache.dtype)
    if kv_cache.dtype == torch.float8_e4m3fn:
        return (kv[0].float() * k_scale).to(dtype), (kv[1].float() * v_scale).to(dtype)
    return kv[0].to(dtype), kv[1].to(dtype)


def paged_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float,
                          k_scale: float = 1.0, v_scale: float = 1.0, chunk_size: int = 0,
                          sliding_window: int = 0) -> torch.Tensor:
    """Reference attention. q: [T, Hq, D] -> out: [T, Hq, D], causal over each request's paged context; with
    `chunk_size`, a query at position p sees only keys in [p // chunk_size * chunk_size, p] (Llama 4's chunked
    local attention); with `sliding_window`, only keys in [p - sliding_window + 1, p]."""
    out = torch.empty_like(q)
    num_q_heads, num_kv_heads = q.shape[1], kv_cache.shape[2]
    bs = batch.block_size
    offsets = torch.arange(bs, device=q.device)
    start = 0
    for i, (ctx, qlen) in enumerate(zip(batch.seq_lens_cpu, batch.query_lens_cpu)):
        blocks = batch.block_tables[i, : (ctx + bs - 1) // bs]
        slots = (blocks[:, None] * bs + offsets).flatten()[:ctx]
        k, v = read_kv_torch(kv_cache, slots, q.dtype, k_scale, v_scale)  # [ctx, Hkv, D]
        qi = q[start : start + qlen].transpose(0, 1)  # [Hq, qlen, D]
        k = k.transpose(0, 1).repeat_interleave(num_q_heads // num_kv_heads, dim=0)  # [Hq, ctx, D]
        v = v.transpose(0, 1).repeat_interleave(num_q_heads // num_kv_heads, dim=0)
        q_pos = torch.arange(ctx - qlen, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos[:, None]  # [qlen, ctx]
        if chunk_size:
            mask &= k_pos >= (q_pos // chunk_size * chunk_size)[:, None]
        if sliding_window:
            mask &= k_pos > (q_pos - sliding_window)[:, None]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start : start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends over it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: str = "torch", chunk_size: int = 0, sliding_window: int = 0) -> None:
        super().__init__()
        if backend not in ("torch", "triton"):
            raise ValueError(f"attention backend {backend!r} is not available; use 'torch' or 'triton'")
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.chunk_size, self.sliding_window = chunk_size, sliding_window  # local attention (Llama 4); 0 = off
        self.kv_cache: torch.Tensor | None = None  # bound by the model runner
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq * D]; k, v: [T, Hkv * D] -> [T, Hq * D]."""
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not bound; the model runner binds it before the first step")
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        write_kv_torch(self.kv_cache, k, v, batch.slot_mapping, self.k_scale, self.v_scale)
        if self.backend == "triton":
            out = self._triton(q, batch)
        else:
            out = paged_attention_torch(q, self.kv_cache, batch, self.scale, self.k_scale, self.v_scale,
                                        self.chunk_size, self.sliding_window)
        return out.reshape(t, self.num_heads * self.head_dim)

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, rotary: nn.Module, batch: ForwardBatch,
                    out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """qkv: [T, (Hq + 2 Hkv) * D] straight from the fused projection -> [T, Hq * D] (FP8 with `out_scale`)."""
        d = self.head_dim
        if self.backend != "triton" or d & (d - 1) or self.kv_cache is None:
            q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
            q, k = rotary(positions, q, k)
            out = self(q, k, v, batch)  # through __call__, so calibration hooks see q, k, v
            if out_scale is not None:
                from llamaserve.layers.quantization import quantize_fp8

                out = quantize_fp8(out, out_scale)
            return out
        from llamaserve.kernels.rope_kv import rope_and_write_kv

        t = qkv.shape[0]
        q = rope_and_write_kv(qkv, positions, rotary.cos_cache, rotary.sin_cache, self.kv_cache, batch.slot_mapping,
                              self.num_heads, self.num_kv_heads, d, self.k_scale, self.v_scale)
        return self._triton(q, batch, out_scale).reshape(t, self.num_heads * d)

    def _triton(self, q: torch.Tensor, batch: ForwardBatch, out_scale: torch.Tensor | None = None,
                rope: RopeInputs | None = None) -> torch.Tensor:
        """q [T, Hq, D], or with `rope` (kernels/paged_attention.py `RopeInputs`) the QKV output, which RoPE and
        the KV write take first (inside the attention kernel for split decode steps)."""
        from llamaserve.kernels import paged_attention as pa

        tiles = pa.step_tiles(batch.cache, batch.query_lens_cpu, self.num_heads // self.num_kv_heads, q.device)
        return pa.paged_attention(q, self.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                  batch.query_lens_cpu, batch.block_size, self.scale, self.k_scale, self.v_scale,
                                  tiles=tiles, out_scale=out_scale, chunk_size=self.chunk_size,
                                  sliding_window=self.sliding_window, rope=rope)
