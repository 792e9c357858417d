"""Triton kernel: RoPE on q and k fused with the KV-cache write, straight from the fused QKV projection output.

One program per token reads its row of `qkv` [T, (Hq + 2 Hkv) * D] once, rotates q and k ("neox" halves, the
Hugging Face Llama layout) with the cos/sin table at the token's position, writes the rotated q to `q_out`
[T, Hq, D], and writes k and v to `kv_cache[0 / 1, slot_mapping[t]]` (FP8 caches: value / scale, rounded to
nearest even and saturated, as `write_kv_torch` does). The reference is RotaryEmbedding.forward followed by
write_kv_torch (layers/rotary.py, layers/attention.py); it replaces about a dozen elementwise launches per layer.

Llama 4 options: `rope=False` (NoPE layers: q and k pass through unrotated), `qk_norm_eps` (the weightless L2 norm
of q and k per head after RoPE, in float32, as models/llama4.py `l2_norm`), `temperature=(floor_scale,
attn_scale)` (q scaled by log(1 + floor((pos + 1) / floor_scale)) * attn_scale + 1, NoPE layers). The KV cache
gets the normed k, as in the unfused path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamaserve.kernels.norm_act import round_e4m3


@triton.jit
def _rotate(X, row_off, heads, h_ok, half, cos, sin, HALF: tl.constexpr, ROPE: tl.constexpr = True,
            NORM: tl.constexpr = False, eps=1e-6):
    x1 = tl.load(X + row_off + heads[:, None] * (2 * HALF) + half[None, :], mask=h_ok[:, None], other=0.0)
    x2 = tl.load(X + row_off + heads[:, None] * (2 * HALF) + HALF + half[None, :], mask=h_ok[:, None], other=0.0)
    if ROPE:
        c = cos.to(x1.dtype)[None, :]
        s = sin.to(x1.dtype)[None, :]
        r1 = x1 * c - x2 * s
        x2 = x2 * c + x1 * s
        x1 = r1
    if NORM:  # weightless L2 (RMS) norm over the head, float32, rounded back
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.math.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)
        x1 = (f1 * inv[:, None]).to(x1.dtype)
        x2 = (f2 * inv[:, None]).to(x2.dtype)
    return x1, x2


@triton.jit
def _cos_sin(Cos, Sin, pos, stride_cos, half, ROPE: tl.constexpr):
    """The first half of the cos / sin rows at `pos` (unused stand-ins on NoPE layers)."""
    if ROPE:
        cos = tl.load(Cos + pos * stride_cos + half)
        sin = tl.load(Sin + pos * stride_cos + half)
    else:
        cos = half
        sin = half
    return cos, sin


@triton.jit
def _temperature(q1, q2, pos, floor_scale, attn_scale):
    """Attention temperature tuning (Llama 4 NoPE layers): q scaled in float32 as the reference."""
    temp = tl.log(1.0 + tl.floor((pos.to(tl.float32) + 1.0) / floor_scale)) * attn_scale + 1.0
    return (q1.to(tl.float32) * temp).to(q1.dtype), (q2.to(tl.float32) * temp).to(q2.dtype)


@triton.jit
def _store_kv(Cache, off, x, mask, scale, FP8: tl.constexpr):
    if FP8:
        x = round_e4m3(x.to(tl.float32) / scale)
    tl.store(Cache + off, x.to(Cache.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_kernel(QKV, Qout, KV, Pos, Slots, Cos, Sin, k_scale, v_scale, eps, floor_scale, attn_scale,
                    stride_qkv, stride_qo, stride_kv_side, stride_slot, stride_cos,
                    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, FP8: tl.constexpr,
                    ROPE: tl.constexpr = True, NORM: tl.constexpr = False, TEMP: tl.constexpr = False):
    t = tl.program_id(0)
    pos = tl.load(Pos + t)
    slot = tl.load(Slots + t).to(tl.int64)
    half = tl.arange(0, HALF)
    cos, sin = _cos_sin(Cos, Sin, pos, stride_cos, half, ROPE)
    row = QKV + t.to(tl.int64) * stride_qkv
    D: tl.constexpr = 2 * HALF

    hq = tl.arange(0, BLOCK_HQ)
    hq_ok = hq < HQ
    q1, q2 = _rotate(row, 0, hq, hq_ok, half, cos, sin, HALF, ROPE, NORM, eps)
    if TEMP:
        q1, q2 = _temperature(q1, q2, pos, floor_scale, attn_scale)
    qo = Qout + t.to(tl.int64) * stride_qo + hq[:, None] * D + half[None, :]
    tl.store(qo, q1.to(Qout.dtype.element_ty), mask=hq_ok[:, None])
    tl.store(qo + HALF, q2.to(Qout.dtype.element_ty), mask=hq_ok[:, None])

    hk = tl.arange(0, BLOCK_HKV)
    hk_ok = hk < HKV
    k1, k2 = _rotate(row, HQ * D, hk, hk_ok, half, cos, sin, HALF, ROPE, NORM, eps)
    dst = slot * stride_slot + hk[:, None] * D + half[None, :]
    _store_kv(KV, dst, k1, hk_ok[:, None], k_scale, FP8)
    _store_kv(KV, dst + HALF, k2, hk_ok[:, None], k_scale, FP8)
    v_off = (HQ + HKV) * D + hk[:, None] * D + half[None, :]
    v1 = tl.load(row + v_off, mask=hk_ok[:, None], other=0.0)
    v2 = tl.load(row + v_off + HALF, mask=hk_ok[:, None], other=0.0)
    _store_kv(KV + stride_kv_side, dst, v1, hk_ok[:, None], v_scale, FP8)
    _store_kv(KV + stride_kv_side, dst + HALF, v2, hk_ok[:, None], v_scale, FP8)


def rope_and_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                      kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                      head_dim: int, k_scale: float = 1.0, v_scale: float = 1.0, rope: bool = True,
                      qk_norm_eps: float | None = None, temperature: tuple[float, float] | None = None
                      ) -> torch.Tensor:
    """qkv: [T, (Hq + 2 Hkv) * D] -> rotated q [T, Hq, D]; rotated k and v go into kv_cache at slot_mapping.
    Llama 4: `rope` off for NoPE layers, `qk_norm_eps`, `temperature` = (floor_scale, attn_scale)."""
    t = qkv.shape[0]
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"the fused RoPE kernel needs a power-of-two head_dim, got {head_dim}")
    assert qkv.stride(1) == 1 and kv_cache.is_contiguous() and cos_cache.is_contiguous()
    _rope_kv_kernel[(t,)](
        qkv, q, kv_cache, positions, slot_mapping, cos_cache, sin_cache, k_scale, v_scale,
        qk_norm_eps if qk_norm_eps is not None else 0.0, *(temperature or (1.0, 0.0)),
        qkv.stride(0), q.stride(0), kv_cache.stride(0), kv_cache.stride(1), cos_cache.stride(0),
        HQ=num_heads, HKV=num_kv_heads, HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads), FP8=kv_cache.dtype == torch.float8_e4m3fn,
        ROPE=rope, NORM=qk_norm_eps is not None, TEMP=temperature is not None,
    )
    return q
