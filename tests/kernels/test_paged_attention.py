"""Triton paged attention against the torch reference, on fresh random mixed prefill + decode batches."""

from __future__ import annotations

import random

import pytest
import torch

from llamaserve.kernels.paged_attention import paged_attention
from llamaserve.layers.attention import ForwardBatch, paged_attention_torch, write_kv_torch


def _batch(ctx_lens: list[int], q_lens: list[int], block_size: int, num_blocks: int, device, gen) -> ForwardBatch:
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max((c + block_size - 1) // block_size for c in ctx_lens)
    tables, used = [], 0
    for c in ctx_lens:
        n = (c + block_size - 1) // block_size
        tables.append(perm[used : used + n] + [0] * (max_blocks - n))
        used += n
    block_tables = torch.tensor(tables, dtype=torch.int64, device=device)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    positions, slots = [], []
    for i, (c, q) in enumerate(zip(ctx_lens, q_lens)):
        for p in range(c - q, c):
            positions.append(p)
            slots.append(tables[i][p // block_size] * block_size + p % block_size)
    return ForwardBatch(torch.tensor(positions, device=device), torch.tensor(slots, device=device), block_tables,
                        torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                        torch.tensor(qsl, dtype=torch.int32, device=device), ctx_lens, q_lens, block_size)


CASES = [  # (num_q_heads, num_kv_heads, head_dim, block_size, [(ctx, qlen), ...])
    (4, 2, 32, 16, [(1, 1), (37, 37), (50, 1), (70, 13)]),  # fresh prefill, decode, chunk
    (8, 1, 64, 16, [(130, 1), (5, 1), (17, 1)]),  # decode only, GQA 8:1
    (4, 4, 16, 8, [(90, 90)]),  # MHA, one long prefill
    (6, 2, 48, 32, [(33, 3), (64, 64)]),  # head_dim not a power of two
]


def _rope_decode_step(ctx, kv_dtype, variant, device, hq=8, hkv=2, d=64, bs=16):
    """A decode step of len(ctx) requests for attention with RoPE inside: (dtype, batch, a random cache, the QKV
    output, RopeInputs with `variant`, k_scale, v_scale)."""
    from llamaserve.kernels.paged_attention import RopeInputs
    from llamaserve.layers.rotary import RotaryEmbedding

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    num_blocks = sum((c + bs - 1) // bs for c in ctx) + 2
    batch = _batch(ctx, [1] * len(ctx), bs, num_blocks, device, gen)
    cache_dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else dtype
    k_scale, v_scale = (0.05, 0.08) if kv_dtype == "fp8" else (1.0, 1.0)
    cache = (torch.randn(2, num_blocks * bs, hkv, d, generator=gen) * 3).to(device, dtype).to(cache_dtype)
    qkv = torch.randn(len(ctx), (hq + 2 * hkv) * d, generator=gen).to(device, dtype)
    rot = RotaryEmbedding(d, 2 * max(ctx), 10000.0, {}).to(device)
    rope = RopeInputs(batch.positions, batch.slot_mapping, rot.cos_cache, rot.sin_cache, **variant)
    return dtype, batch, cache, qkv, rope, k_scale, v_scale


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_matches_reference(case, kv_dtype, device):
    _check_case(case, kv_dtype, device)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_splits", [2, 4, 16])
def test_split_kv_decode(num_splits, fused, sparse, device, monkeypatch):
    """Split-KV (flash-decoding) gives the same decode output; splits past a short context stay empty. Fused: the
    last split of each (tile, kv head) merges them in the attention kernel, and leaves its counter zero for the
    next launch; otherwise the separate combine kernel (LLAMASERVE_ATTN_FUSED_COMBINE=0). Sparse (default): empty
    splits and padding rows store and load no partial output (LLAMASERVE_ATTN_SPARSE_MERGE=0: all of them)."""
    from llamaserve.kernels import paged_attention as pa

    monkeypatch.setenv("LLAMASERVE_ATTN_FUSED_COMBINE", "1" if fused else "0")
    monkeypatch.setenv("LLAMASERVE_ATTN_SPARSE_MERGE", "1" if sparse else "0")
    assert (pa.split_counters(device, 8) is not None) == fused
    for _ in range(2):  # a second launch reuses the counters
        _check_case((8, 2, 64, 16, [(300, 1), (5, 1), (1, 1), (129, 1)]), "model", device, num_splits=num_splits)
        _check_case((4, 1, 32, 16, [(70, 1), (33, 1)]), "fp8", device, num_splits=num_splits)
    if fused:
        assert not pa.split_counters(device, 8).any()


@pytest.mark.parametrize("local", [{"chunk_size": 32}, {"chunk_size": 48}, {"sliding_window": 20}])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_local_attention(local, num_splits, device):
    """Chunked local attention (Llama 4) and sliding windows: prompts longer than a chunk, chunks crossing a tile,
    decodes right after a chunk boundary, split-KV decodes."""
    if num_splits:  # split-KV applies to decode steps
        case = (8, 2, 64, 16, [(100, 1), (33, 1), (96, 1), (7, 1)])
    else:
        case = (8, 2, 64, 16, [(100, 100), (70, 13), (33, 1), (96, 1)])
    _check_case(case, "model", device, num_splits=num_splits, **local)


def test_fp32_prefill_head_dim_128(device):
    """float32 models on a GPU (the parity tests' dtype) take the prefill path with head_dim 128: the tile must fit
    in shared memory there too."""
    _check_case((8, 2, 128, 16, [(200, 200), (40, 1)]), "model", device, dtype=torch.float32)


def _check_case(case, kv_dtype, device, num_splits=None, dtype=None, **local):
    hq, hkv, d, bs, reqs = case
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ctx, ql = [c for c, _ in reqs], [q for _, q in reqs]
    num_blocks = sum((c + bs - 1) // bs for c in ctx) + 3
    batch = _batch(ctx, ql, bs, num_blocks, device, gen)
    cache_dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else dtype
    cache = torch.zeros(2, num_blocks * bs, hkv, d, dtype=cache_dtype, device=device)
    # the whole context: earlier tokens and this step's
    k_scale, v_scale = (0.05, 0.08) if kv_dtype == "fp8" else (1.0, 1.0)
    for i, c in enumerate(ctx):
        blocks = batch.block_tables[i, : (c + bs - 1) // bs]
        slots = (blocks[:, None] * bs + torch.arange(bs, device=device)).flatten()[:c]
        k = torch.randn(c, hkv, d, generator=gen).to(device, dtype)
        v = torch.randn(c, hkv, d, generator=gen).to(device, dtype)
        write_kv_torch(cache, k, v, slots, k_scale, v_scale)
    q = torch.randn(sum(ql), hq, d, generator=gen).to(device, dtype)
    scale = d**-0.5
    ref = paged_attention_torch(q, cache, batch, scale, k_scale, v_scale, **local)
    if local:  # the window must matter here, or the test would pass a kernel that ignores it
        assert not torch.allclose(ref, paged_attention_torch(q, cache, batch, scale, k_scale, v_scale), atol=1e-3)
    out = paged_attention(q, cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, ql, bs, scale,
                          k_scale, v_scale, num_splits=num_splits, **local)
    tol = 2e-5 if dtype == torch.float32 and kv_dtype == "model" else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("early", ["1", "0"])
def test_fp8_output(early, device, monkeypatch):
    """With out_scale the kernel writes the reference output quantized to FP8 (what a static-scaled o_proj takes);
    the scale loaded first (LLAMASERVE_EARLY_LOADS, the default) or where it is used."""
    monkeypatch.setenv("LLAMASERVE_EARLY_LOADS", early)
    from llamaserve.layers.quantization import quantize_fp8

    hq, hkv, d, bs = 8, 2, 64, 16
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ctx, ql = [40, 9], [40, 1]
    num_blocks = 8
    batch = _batch(ctx, ql, bs, num_blocks, device, gen)
    cache = torch.randn(2, num_blocks * bs, hkv, d, generator=gen).to(device, dtype)
    q = torch.randn(sum(ql), hq, d, generator=gen).to(device, dtype)
    scale = 0.002
    out_scale = torch.tensor(scale, device=device)
    ref = paged_attention_torch(q, cache, batch, d**-0.5).float().clamp(-448 * scale, 448 * scale)  # saturates
    assert (ref.abs() == 448 * scale).any()
    got = paged_attention(q, cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, ql, bs, d**-0.5,
                          out_scale=out_scale)
    assert got.dtype == torch.float8_e4m3fn
    # dequantized, within one e4m3 step of the reference (relative 2^-3, or 2^-9 * scale among subnormals), plus
    # the reference's own rounding in bf16
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float() * scale, ref, atol=tol + 2**-9 * scale, rtol=0.13)
    if dtype == torch.float32:  # and exactly the reference quantized, up to rare ties
        assert (got.float() == quantize_fp8(ref, out_scale).float()).float().mean() > 0.99
    decode = paged_attention(q[40:], cache, batch.block_tables[1:], batch.seq_lens[1:],
                             batch.query_start_loc[1:] - 40, [1], bs, d**-0.5, out_scale=out_scale, num_splits=4)
    torch.testing.assert_close(decode.float() * scale, ref[40:], atol=tol + 2**-9 * scale, rtol=0.13)


@pytest.mark.parametrize("variant", [{}, {"qk_norm_eps": 1e-5}, {"rope": False, "temperature": (4.0, 0.1)}])
@pytest.mark.parametrize("kv_dtype,local", [("model", {}), ("fp8", {}), ("fp8", {"chunk_size": 32})])
def test_rope_inside_split_decode_attention(variant, kv_dtype, local, device, monkeypatch):
    """RoPE (or NoPE + temperature), the QK norm and the KV write inside split decode attention, from the QKV
    output: the same output and the same cache bytes as rope_and_write_kv followed by attention; other steps
    (LLAMASERVE_ATTN_FUSED_ROPE=0, one split, a prefill) run rope_and_write_kv first and agree too."""
    from llamaserve.kernels import rope_kv

    hq, hkv, d, bs = 8, 2, 64, 16
    ctx = [40, 17, 1, 33, 64]
    dtype, batch, cache, qkv, rope, k_scale, v_scale = _rope_decode_step(ctx, kv_dtype, variant, device)

    def run(c, q, splits, **kw):
        return paged_attention(q, c, batch.block_tables, batch.seq_lens, batch.query_start_loc, [1] * len(ctx), bs,
                               d**-0.5, k_scale, v_scale, num_splits=splits, **local, **kw)

    want_cache = cache.clone()
    q = rope_kv.rope_and_write_kv(qkv, rope.positions, rope.cos, rope.sin, want_cache, rope.slot_mapping, hq, hkv,
                                  d, k_scale, v_scale, rope.rope, rope.qk_norm_eps, rope.temperature)
    want = run(want_cache, q, 4).float()
    calls = []
    monkeypatch.setattr(rope_kv, "rope_and_write_kv", lambda *a: calls.append(1) or q)
    got_cache = cache.clone()
    got = run(got_cache, qkv, 4, rope=rope).float()
    assert not calls  # fused: no separate RoPE kernel
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(got_cache.view(torch.uint8), want_cache.view(torch.uint8))
    monkeypatch.undo()
    monkeypatch.setenv("LLAMASERVE_EARLY_LOADS", "0")  # and with the loads where they are used: the same bytes
    early_off_cache = cache.clone()
    assert torch.equal(run(early_off_cache, qkv, 4, rope=rope).float(), got)
    assert torch.equal(early_off_cache.view(torch.uint8), want_cache.view(torch.uint8))
    monkeypatch.delenv("LLAMASERVE_EARLY_LOADS")
    for splits, env in ((4, "0"), (1, "1")):
        monkeypatch.setenv("LLAMASERVE_ATTN_FUSED_ROPE", env)
        got_cache = cache.clone()
        torch.testing.assert_close(run(got_cache, qkv, splits, rope=rope).float(), run(want_cache, q, splits).float(),
                                   atol=tol, rtol=tol)
        assert torch.equal(got_cache.view(torch.uint8), want_cache.view(torch.uint8))


@pytest.mark.parametrize("local,num_splits", [({}, None), ({}, 4), ({"chunk_size": 32}, 4), ({"sliding_window": 20},
                                                                                             None)])
def test_early_loads_same_bytes(local, num_splits, device, monkeypatch):
    """The first key tile's block-table entries and the FP8 output scale loaded first (LLAMASERVE_EARLY_LOADS, the
    default) or where they are used: the same output bytes, for prefill chunks and decode rows, split or not,
    global, chunked and sliding-window attention, with an FP8 cache and output."""
    hq, hkv, d, bs = 4, 2, 32, 16
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ctx, ql = ([130, 5, 17, 64], [1, 1, 1, 1]) if num_splits else ([1, 37, 50, 70], [1, 37, 1, 13])
    num_blocks = sum((c + bs - 1) // bs for c in ctx) + 3
    batch = _batch(ctx, ql, bs, num_blocks, device, gen)
    cache = torch.randn(2, num_blocks * bs, hkv, d, generator=gen).to(device, dtype).to(torch.float8_e4m3fn)
    q = torch.randn(sum(ql), hq, d, generator=gen).to(device, dtype)
    out_scale = torch.tensor(0.01, device=device)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LLAMASERVE_EARLY_LOADS", flag)
        outs.append(paged_attention(q, cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, ql, bs,
                                    d**-0.5, 0.05, 0.08, num_splits=num_splits, out_scale=out_scale, **local))
    assert torch.equal(outs[0].view(torch.uint8), outs[1].view(torch.uint8))
    assert outs[0].float().abs().sum() > 0


def test_unsplit_decode_launch_override(device, monkeypatch):
    """LLAMASERVE_ATTN_DECODE_LAUNCH (an A/B switch for unsplit decode steps, the wide batches): other key tiles,
    warps and stages give the same attention within rounding (FP8 cache, 1-130 keys); a malformed value names
    itself, and split steps do not read it."""
    hq, hkv, d, bs = 4, 2, 32, 16
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ctx, ql = [130, 5, 17, 64, 1], [1] * 5
    num_blocks = sum((c + bs - 1) // bs for c in ctx) + 3
    batch = _batch(ctx, ql, bs, num_blocks, device, gen)
    cache = torch.randn(2, num_blocks * bs, hkv, d, generator=gen).to(device, dtype).to(torch.float8_e4m3fn)
    q = torch.randn(sum(ql), hq, d, generator=gen).to(device, dtype)

    def run(num_splits=1):
        return paged_attention(q, cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, ql, bs, d**-0.5,
                               0.05, 0.08, num_splits=num_splits).float()

    want = run()
    for launch in ("64x4x2", "16x2x4"):
        monkeypatch.setenv("LLAMASERVE_ATTN_DECODE_LAUNCH", launch)
        torch.testing.assert_close(run(), want, atol=2e-2, rtol=2e-2)
    monkeypatch.setenv("LLAMASERVE_ATTN_DECODE_LAUNCH", "64x4")
    with pytest.raises(ValueError, match="LLAMASERVE_ATTN_DECODE_LAUNCH='64x4'"):
        run()
    assert run(num_splits=4).shape == want.shape  # split steps keep their own launch


@pytest.mark.parametrize("hq", [8, 10])
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_unsplit_decode_each_group_launch(hq, kv_dtype, device):
    """Unsplit decode (the wide batches' path) takes its launch from the query group: FP8 caches run 64-key tiles x
    2 warps for a group that is not a power of two (Llama 4's 5; here 10 / 2) and 32 x 1 for 4; both match the
    reference."""
    _check_case((hq, 2, 64, 16, [(130, 1), (5, 1), (77, 1), (1, 1)]), kv_dtype, device, num_splits=1)
