"""Fused RoPE + KV-cache write against RotaryEmbedding + write_kv_torch, on fresh random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from llamaserve.kernels.rope_kv import rope_and_write_kv
from llamaserve.layers.attention import write_kv_torch
from llamaserve.layers.rotary import RotaryEmbedding

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


def _inputs(t: int, width: int, max_pos: int, num_slots: int, dtype: torch.dtype, device: torch.device):
    """Fresh random qkv [t, width], positions below max_pos and t distinct cache slots."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    qkv = torch.randn(t, width, generator=gen).to(device, dtype)
    positions = torch.randint(0, max_pos, (t,), generator=gen).to(device)
    slots = torch.randperm(num_slots, generator=gen)[:t].to(device)
    return qkv, positions, slots


@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (4, 4, 32)])
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_matches_reference(heads, kv_dtype, device):
    hq, hkv, d = heads
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rope = RotaryEmbedding(d, 4096, 500000.0, LLAMA3).to(device)
    t, num_slots = 11, 64
    qkv, positions, slots = _inputs(t, (hq + 2 * hkv) * d, 4096, num_slots, dtype, device)
    cache_dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else dtype
    k_scale, v_scale = (0.02, 0.03) if kv_dtype == "fp8" else (1.0, 1.0)
    want_cache = torch.zeros(2, num_slots, hkv, d, dtype=cache_dtype, device=device)
    got_cache = want_cache.clone()

    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    want_q, want_k = rope(positions, q, k)
    write_kv_torch(want_cache, want_k.view(t, hkv, d), v.reshape(t, hkv, d), slots, k_scale, v_scale)
    got_q = rope_and_write_kv(qkv, positions, rope.cos_cache, rope.sin_cache, got_cache, slots, hq, hkv, d,
                              k_scale, v_scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_q, want_q.view(t, hq, d), atol=tol, rtol=tol)
    if kv_dtype == "fp8":
        # dequantized, one e4m3 step apart at most, plus (bf16) the reference's own rounding: it rounds the two
        # RoPE products before subtracting them, so a rotated k near 0 can be off by a bf16 step of the products
        scales = torch.tensor([k_scale, v_scale], device=device).view(2, 1, 1, 1)
        step = tol + 2**-9 * max(k_scale, v_scale)
        torch.testing.assert_close(got_cache.float() * scales, want_cache.float() * scales, atol=step, rtol=0.13)
        share = (got_cache.float() == want_cache.float()).float().mean()
        assert share > (0.98 if dtype == torch.float32 else 0.9), share
    else:
        torch.testing.assert_close(got_cache, want_cache, atol=tol, rtol=tol)
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert (got_cache[:, untouched].float() == 0).all()


@pytest.mark.parametrize("variant", ["rope_qk_norm", "nope_temperature"])
def test_llama4_options_match_reference(variant, device):
    """Llama 4: RoPE + L2 QK-norm (RoPE layers) and no RoPE + attention temperature (NoPE layers), against the
    unfused ops of models/llama4.py; the cache gets the normed k."""
    from llamaserve.models.llama4 import l2_norm

    hq, hkv, d = 8, 2, 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rope = RotaryEmbedding(d, 40000, 500000.0, LLAMA3).to(device)
    t, num_slots = 9, 32
    qkv, positions, slots = _inputs(t, (hq + 2 * hkv) * d, 40000, num_slots, dtype, device)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    if variant == "rope_qk_norm":
        q, k = rope(positions, q, k)
        q, k = l2_norm(q.reshape(t, hq, d), 1e-5), l2_norm(k.reshape(t, hkv, d), 1e-5)
        kw = {"rope": True, "qk_norm_eps": 1e-5}
    else:
        scale = torch.log1p(torch.floor((positions.float() + 1.0) / 8192.0)) * 0.1 + 1.0
        assert scale.max() > 1.0  # positions past floor_scale, so the temperature matters
        q = (q * scale[:, None]).to(q.dtype)
        kw = {"rope": False, "temperature": (8192.0, 0.1)}
    want_cache = torch.zeros(2, num_slots, hkv, d, dtype=dtype, device=device)
    write_kv_torch(want_cache, k.reshape(t, hkv, d), v.reshape(t, hkv, d), slots, 1.0, 1.0)
    got_cache = torch.zeros_like(want_cache)
    got_q = rope_and_write_kv(qkv, positions, rope.cos_cache, rope.sin_cache, got_cache, slots, hq, hkv, d, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_q, q.reshape(t, hq, d), atol=tol, rtol=tol)
    torch.testing.assert_close(got_cache, want_cache, atol=tol, rtol=tol)
