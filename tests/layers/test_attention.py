"""Paged attention (torch reference) against plain causal attention on contiguous tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaserve.layers.attention import ForwardBatch, paged_attention_torch, write_kv_torch


def dense_causal(q, k, v, scale):
    """q: [L, Hq, D] (the last L of S positions); k, v: [S, Hkv, D]."""
    rep = q.shape[1] // k.shape[1]
    s, L = k.shape[0], q.shape[0]
    mask = torch.ones(L, s, dtype=torch.bool).tril(diagonal=s - L)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(rep, 0),
                                       v.transpose(0, 1).repeat_interleave(rep, 0), attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("kv_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float8_e4m3fn, 0.15)])
def test_mixed_prefill_decode_batch_over_shuffled_blocks(kv_dtype, tol):
    gen = torch.Generator().manual_seed(0)
    bs, hq, hkv, d, num_blocks = 4, 8, 2, 16, 64
    cache = torch.zeros((2, num_blocks * bs, hkv, d), dtype=kv_dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    # (context already cached, new tokens): a decode, a fresh prefill, a prefill chunk, a 1-token prompt
    reqs = [(13, 1), (0, 9), (8, 7), (0, 1)]
    qs, ks, vs, refs_k, refs_v, tables, slots, positions = [], [], [], [], [], [], [], []
    for ctx, new in reqs:
        total = ctx + new
        blocks = [free.pop() for _ in range(-(-total // bs))]
        tables.append(blocks)
        k = torch.randn(total, hkv, d, generator=gen)
        v = torch.randn(total, hkv, d, generator=gen)
        refs_k.append(k)
        refs_v.append(v)
        all_slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(total)])
        if ctx:
            write_kv_torch(cache, k[:ctx], v[:ctx], all_slots[:ctx], 1.0, 1.0)
        qs.append(torch.randn(new, hq, d, generator=gen))
        ks.append(k[ctx:])
        vs.append(v[ctx:])
        slots.append(all_slots[ctx:])
        positions.append(torch.arange(ctx, total))
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    seq_lens = [c + n for c, n in reqs]
    qlens = [n for _, n in reqs]
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist())
    batch = ForwardBatch(torch.cat(positions), torch.cat(slots), bt, torch.tensor(seq_lens), cu, seq_lens, qlens, bs)
    write_kv_torch(cache, torch.cat(ks), torch.cat(vs), batch.slot_mapping, 1.0, 1.0)
    out = paged_attention_torch(torch.cat(qs), cache, batch, d**-0.5)
    start = 0
    for i, (_, new) in enumerate(reqs):
        ref = dense_causal(qs[i], refs_k[i], refs_v[i], d**-0.5)
        err = (out[start : start + new] - ref).abs().max().item()
        assert err < tol, (i, err)
        start += new


def test_fp8_scales_round_trip():
    cache = torch.zeros((2, 8, 1, 4), dtype=torch.float8_e4m3fn)
    k = torch.tensor([[[1000.0, -2000.0, 0.5, 3.0]]])
    write_kv_torch(cache, k, k, torch.tensor([3]), 10.0, 10.0)
    stored = cache[0, 3].float()
    assert torch.allclose(stored * 10.0, k[0], rtol=0.07)
