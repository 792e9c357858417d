"""Triton paged attention for mixed prefill + decode steps (varlen, causal, GQA, bf16/fp16/fp32 or fp8 KV,
optional sliding window or chunked local attention).

One program handles a tile of query tokens of one request against one KV head, with that KV head's whole query
group packed into the rows of the tile (row r = token r // G, head kv_head * G + r % G), so a decode step (one
token) still fills G rows of the MMA. The keys and values are walked in tiles of `BLOCK_N` positions through the
request's block table, with an online softmax in fp32. FP8 caches hold value / scale: keys and values are
converted to fp16 (one hardware conversion; q too, so the dots run in fp16 with fp32 accumulation) and the
per-layer scales are applied to the scores (k_scale) and to the output (v_scale), never per element. With
`out_scale` the output is written as FP8 (value / out_scale, for an FP8 o_proj with a static input scale).

The tile table (which request and which query tokens each program takes) is built on the host from the step's
query lengths, which the scheduler knows anyway; `paged_attention_torch` in layers/attention.py is the reference.

Local attention (Llama 4's `attention_chunk_size`, or a sliding window): a query at position p sees the keys
in [floor(p / chunk) * chunk, p] (chunked) or [p - window + 1, p] (sliding); the walk starts at the tile's lowest
visible key, and every key block is masked.

Split-KV (decode steps with few programs, e.g. batch 1): the context of each tile is cut into `num_splits`
equal ranges, one program each (grid axis 2); each writes its unnormalized partial output with its running max
and sum to a workspace, and they are merged (the flash-decoding reduction) by the last split program of each
(tile, KV head) to finish, which an arrival counter names (device_utils.arrival_counters; no second launch), or
by `_combine_kernel` (LLAMASERVE_ATTN_FUSED_COMBINE=0, or while capturing a CUDA graph before a counter buffer
exists). The split count depends only on the grid size, never on context lengths, so a CUDA graph captured
once serves every context length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llamaserve.device_utils import arrival_counters, h2d
from llamaserve.kernels import launch_from_env, rope_kv
from llamaserve.kernels.norm_act import round_e4m3
from llamaserve.kernels.pdl import early_loads, gdc_wait, pdl_args
from llamaserve.kernels.rope_kv import _cos_sin, _rotate, _store_kv, _temperature


@triton.jit
def _attn_block(acc, m_i, l_i, q, K, V, table, n0, hi, q_pos, q_lo, row_ok, kv_head, d, d_ok, stride_kslot,
                stride_kh,
                qk_scale, k_scale, v_scale, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr,
                PREC: tl.constexpr, MASKED: tl.constexpr, blk_lo=None, at_lo=False):
    """One BLOCK_N tile of keys/values into the online softmax (base 2). MASKED: causal and bounds masks.
    `blk_lo`: the block-table entries of the program's first tile, loaded earlier; used when `at_lo`."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        pos_ok = pos < hi
    if blk_lo is not None and at_lo:
        blk = blk_lo  # (masked beyond hi like the masked load below; an unmasked tile lies below hi)
    elif MASKED:
        blk = tl.load(table + pos // PAGE, mask=pos_ok, other=0)
    else:
        blk = tl.load(table + pos // PAGE)
    slot = blk.to(tl.int64) * PAGE + pos % PAGE
    kv_off = slot[:, None] * stride_kslot + kv_head * stride_kh + d[None, :]
    if MASKED:
        kv_mask = pos_ok[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if FP8:  # q is fp16 here; k_scale is folded into qk_scale and v_scale into the output
        k = k.to(tl.float16)
        v = v.to(tl.float16)
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
    if MASKED:
        causal = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] >= q_lo[:, None]) & pos_ok[None, :] \
            & row_ok[:, None]
        s = tl.where(causal, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
    return acc, m_new, l_i


@triton.jit
def _new_kv(Q, row_off, hk, hk_ok, half, cos, sin, eps, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
            ROPE: tl.constexpr, NORM: tl.constexpr):
    """The step's own key (rotated, QK-normed as kernels/rope_kv.py does) and value halves for KV head hk[0], from
    the QKV projection's row at `row_off` (2-row tiles, the second masked)."""
    k1, k2 = _rotate(Q, row_off + HQ * 2 * HALF, hk, hk_ok, half, cos, sin, HALF, ROPE, NORM, eps)
    v_ptrs = Q + row_off + (HQ + HKV) * 2 * HALF + hk[:, None] * 2 * HALF + half[None, :]
    v1 = tl.load(v_ptrs, mask=hk_ok[:, None], other=0.0)
    v2 = tl.load(v_ptrs + HALF, mask=hk_ok[:, None], other=0.0)
    return k1, k2, v1, v2


@triton.jit
def _write_kv(K, V, Slot, hk, hk_ok, half, k1, k2, v1, v2, stride_kslot, stride_kh, k_scale, v_scale,
              HALF: tl.constexpr, FP8: tl.constexpr):
    """The step's own key and value into the cache at its slot (FP8 caches: value / scale)."""
    dst = tl.load(Slot).to(tl.int64) * stride_kslot + hk[:, None] * stride_kh + half[None, :]
    _store_kv(K, dst, k1, hk_ok[:, None], k_scale, FP8)
    _store_kv(K, dst + HALF, k2, hk_ok[:, None], k_scale, FP8)
    _store_kv(V, dst, v1, hk_ok[:, None], v_scale, FP8)
    _store_kv(V, dst + HALF, v2, hk_ok[:, None], v_scale, FP8)


@triton.jit
def _paged_attn_kernel(
    Q, K, V, Out, OutScale, Part, PartML, Counter, block_tables, seq_lens, query_start, tile_req, tile_tok,
    scale, k_scale, v_scale, window,
    stride_qt, stride_qh, stride_kslot, stride_kh, stride_ot, stride_oh, stride_bt,
    GROUP: tl.constexpr, TOK_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr,
    PREC: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, NUM_SPLITS: tl.constexpr, LOCAL: tl.constexpr,
    FUSED_COMBINE: tl.constexpr, SPARSE_MERGE: tl.constexpr,
    Pos=None, Slots=None, Cos=None, Sin=None, stride_cos=0, eps=0.0, floor_scale=1.0, attn_scale=0.0,
    HQ: tl.constexpr = 1, HKV: tl.constexpr = 1, FUSED_ROPE: tl.constexpr = False, ROPE: tl.constexpr = True,
    NORM: tl.constexpr = False, TEMP: tl.constexpr = False, PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(tile_req + tile)
    tok0 = tl.load(tile_tok + tile)  # first query token of the tile, within the request
    q_start = tl.load(query_start + req)
    q_len = tl.load(query_start + req + 1) - q_start
    ctx = tl.load(seq_lens + req)

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOK_PER_TILE * GROUP) & (tok < q_len)
    q_pos = ctx - q_len + tok  # absolute position of each row's token
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # the keys this program walks, [lo, hi): from the step's metadata only
    # keys beyond the last query token of this tile are masked for every row: stop there
    last = tl.minimum(ctx, ctx - q_len + tok0 + TOK_PER_TILE)
    lo = 0
    q_lo = q_pos * 0  # lowest visible key of each row
    if LOCAL == 1:  # chunked local attention
        q_lo = q_pos // window * window
        lo = (ctx - q_len + tok0) // window * window // BLOCK_N * BLOCK_N
    elif LOCAL == 2:  # sliding window
        q_lo = tl.maximum(q_pos - window + 1, 0)
        lo = tl.maximum(ctx - q_len + tok0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = last
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(last - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(last, lo + chunk)
    out_s = None
    blk_lo = None
    if EARLY:  # what no earlier kernel writes, before the wait (pdl.early_loads): the FP8 output scale (else
        # loaded after the merge) and the block-table entries of the first key tile (else loaded after q)
        if HAS_OUT_SCALE:
            out_s = tl.load(OutScale)
        pos_lo = lo + tl.arange(0, BLOCK_N)
        blk_lo = tl.load(block_tables + req * stride_bt + pos_lo // PAGE, mask=pos_lo < hi, other=0)

    if FUSED_ROPE:  # decode: Q is the QKV projection's output; q rotated here as kernels/rope_kv.py does
        HALF: tl.constexpr = HEAD_DIM // 2
        row_off = (q_start + tok0).to(tl.int64) * stride_qt
        pos = tl.load(Pos + q_start + tok0)
        half = tl.arange(0, HALF)
        cos, sin = _cos_sin(Cos, Sin, pos, stride_cos, half, ROPE)
        if PDL:  # a programmatic dependent (kernels/pdl.py): metadata and RoPE tables above, the QKV output below
            gdc_wait()
        q1, q2 = _rotate(Q, row_off, head, row_ok, half, cos, sin, HALF, ROPE, NORM, eps)
        if TEMP:
            q1, q2 = _temperature(q1, q2, pos, floor_scale, attn_scale)
        q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_M, HEAD_DIM))
    else:
        if PDL:
            gdc_wait()
        q_ptrs = Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    out_ty = q.dtype
    if FP8:
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if FUSED_ROPE:  # the split that holds the step's own position writes its key and value first
        hk = kv_head + tl.arange(0, 2)  # one KV head (a 2-row tile, the second masked)
        hk_ok = tl.arange(0, 2) < 1
        if (ctx - 1 >= lo) & (ctx - 1 < hi):
            k1, k2, v1, v2 = _new_kv(Q, row_off, hk, hk_ok, half, cos, sin, eps, HQ, HKV, HALF, ROPE, NORM)
            _write_kv(K, V, Slots + q_start + tok0, hk, hk_ok, half, k1, k2, v1, v2, stride_kslot, stride_kh,
                      k_scale, v_scale, HALF, FP8)
        tl.debug_barrier()  # the program's own cache writes precede its key loads
    # blocks wholly before the tile's first query position need no mask; the rest (the diagonal) do
    full = tl.maximum(lo, tl.minimum(hi, (ctx - q_len + tok0) // BLOCK_N * BLOCK_N))
    if LOCAL != 0:
        full = lo  # every block may hold keys below some row's window
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    if FP8:
        qk_scale = qk_scale * k_scale
    for n0 in range(lo, full, BLOCK_N):
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, K, V, block_tables + req * stride_bt, n0, hi, q_pos, q_lo,
                                    row_ok, kv_head, d, d_ok, stride_kslot, stride_kh, qk_scale, k_scale, v_scale,
                                    BLOCK_N, PAGE, FP8, PREC, False, blk_lo, n0 == lo)
    for n0 in range(full, hi, BLOCK_N):
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, K, V, block_tables + req * stride_bt, n0, hi, q_pos, q_lo,
                                    row_ok, kv_head, d, d_ok, stride_kslot, stride_kh, qk_scale, k_scale, v_scale,
                                    BLOCK_N, PAGE, FP8, PREC, True, blk_lo, n0 == lo)
    if FP8:
        acc = acc * v_scale
    if NUM_SPLITS > 1:  # partial results for _combine_kernel: [tile, kv_head, split, row, d] and (m, l)
        base = ((tile * tl.num_programs(1) + kv_head) * NUM_SPLITS + split) * BLOCK_M
        if SPARSE_MERGE:  # only the rows of real queries, and nothing from a split with no keys (its m is -inf)
            tl.store(Part + (base + rows)[:, None] * BLOCK_D + d[None, :], acc,
                     mask=(row_ok & (rows * 0 + lo < hi))[:, None] & d_ok[None, :])
        else:
            tl.store(Part + (base + rows)[:, None] * BLOCK_D + d[None, :], acc)
        tl.store(PartML + (base + rows) * 2, m_i)
        tl.store(PartML + (base + rows) * 2 + 1, l_i)
        if FUSED_COMBINE:  # the last split of this (tile, kv head) to finish merges them all
            tl.debug_barrier()  # every thread's partial stores precede the release below
            cell = Counter + tile * tl.num_programs(1) + kv_head
            if tl.atomic_add(cell, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                tl.store(cell, 0)  # reset for the next launch (stream order: no launch is in flight)
                _combine_tile(Part, PartML, Out, OutScale, Q, tile * tl.num_programs(1) + kv_head,
                              q_start, tok, head, row_ok, rows, d, stride_ot, stride_oh, BLOCK_M, HEAD_DIM, BLOCK_D,
                              NUM_SPLITS, HAS_OUT_SCALE, SPARSE_MERGE, out_s)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if HAS_OUT_SCALE:
            if out_s is None:
                out_s = tl.load(OutScale)
            out = round_e4m3(out.to(out_ty).to(tl.float32) / out_s)
        o_ptrs = Out + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_tile(Part, PartML, Out, OutScale, Qref, cell, q_start, tok, head, row_ok, rows, d, stride_ot, stride_oh,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  HAS_OUT_SCALE: tl.constexpr, SPARSE_MERGE: tl.constexpr, out_s=None):
    """Merge the NUM_SPLITS partial results of one (tile, kv head) `cell` and store the output (loads through L2:
    in the fused path other programs wrote the partials during this launch). SPARSE_MERGE: partial outputs are
    read only where they count (rows of real queries, splits whose weight is not 0): the splits left without
    keys at short contexts, and the padding rows of a GQA tile, store and load nothing."""
    # all splits' (m, l) in one load, then the partial outputs in an unrolled loop (independent loads in flight
    # together: the combine is latency-bound, not bandwidth-bound)
    sp = tl.arange(0, NUM_SPLITS)
    first = cell * NUM_SPLITS
    ml = PartML + ((first + sp)[:, None] * BLOCK_M + rows[None, :]) * 2
    m_all = tl.load(ml, cache_modifier=".cg")  # [NUM_SPLITS, BLOCK_M]
    l_all = tl.load(ml + 1, cache_modifier=".cg")
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_all = tl.math.exp2(m_all - m_safe[None, :])  # m is in base-2 units
    l_sum = tl.sum(w_all * l_all, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        base = (first + s) * BLOCK_M
        w = tl.math.exp2(tl.load(PartML + (base + rows) * 2, cache_modifier=".cg") - m_safe)
        part = Part + (base + rows)[:, None] * BLOCK_D + d[None, :]
        if SPARSE_MERGE:
            acc += w[:, None] * tl.load(part, mask=row_ok[:, None] & (w > 0.0)[:, None], other=0.0,
                                        cache_modifier=".cg")
        else:
            acc += w[:, None] * tl.load(part, cache_modifier=".cg")
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    if HAS_OUT_SCALE:  # `out_s`: OutScale already loaded
        if out_s is None:
            out_s = tl.load(OutScale)
        out = round_e4m3(out.to(Qref.dtype.element_ty).to(tl.float32) / out_s)
    o_ptrs = Out + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _combine_kernel(Part, PartML, Out, OutScale, Qref, query_start, tile_req, tile_tok, stride_ot, stride_oh,
                    GROUP: tl.constexpr, TOK_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
                    SPARSE_MERGE: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_req + tile)
    tok0 = tl.load(tile_tok + tile)
    q_start = tl.load(query_start + req)
    q_len = tl.load(query_start + req + 1) - q_start
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOK_PER_TILE * GROUP) & (tok < q_len)
    _combine_tile(Part, PartML, Out, OutScale, Qref, tile * tl.num_programs(1) + kv_head, q_start, tok, head,
                  row_ok, rows, tl.arange(0, BLOCK_D), stride_ot, stride_oh, BLOCK_M, HEAD_DIM, BLOCK_D, NUM_SPLITS,
                  HAS_OUT_SCALE, SPARSE_MERGE)


def split_counters(device: torch.device, cells: int) -> torch.Tensor | None:
    """Arrival counters for the fused split-KV merge (one per (tile, kv head)), or None for the separate
    combine kernel: while capturing without a buffer, or with LLAMASERVE_ATTN_FUSED_COMBINE=0."""
    if os.environ.get("LLAMASERVE_ATTN_FUSED_COMBINE", "1") == "0":
        return None
    return arrival_counters(device, "attention", cells)


def num_splits_for(num_programs: int, max_query_len: int) -> int:
    """KV splits for a step: only decode steps whose grid would leave most SMs idle (about 2 waves of 132)."""
    if max_query_len != 1 or num_programs >= 128:
        return 1
    return min(16, triton.next_power_of_2(max(1, 256 // num_programs)))


def tile_table(query_lens: list[int], tok_per_tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, first token) of every tile of `tok_per_tile` query tokens."""
    reqs, toks = [], []
    for i, n in enumerate(query_lens):
        for t in range(0, n, tok_per_tile):
            reqs.append(i)
            toks.append(t)
    return h2d(reqs, torch.int32, device), h2d(toks, torch.int32, device)  # no host sync (overlap scheduling)


def block_m_for(group: int, max_query_len: int) -> int:
    """Rows per tile: at least the query group; more query tokens per tile when there are prefills."""
    rows = 16 if max_query_len == 1 else 128
    return max(rows, triton.next_power_of_2(group))


def tile_shape(group: int, query_lens: list[int], block_m: int | None = None) -> tuple[int, int]:
    """(rows per tile, query tokens per tile) for a step with these query lengths."""
    block_m = block_m or block_m_for(group, max(query_lens, default=1))
    return block_m, max(1, block_m // group)


def step_tiles(cache: dict, query_lens: list[int], group: int, device: torch.device,
               block_m: int | None = None) -> tuple:
    """The tile table of a step, built once in `cache` (ForwardBatch.cache) and shared by every layer."""
    _, tok_per_tile = tile_shape(group, query_lens, block_m)
    key = ("attn_tiles", tok_per_tile)
    if key not in cache:
        cache[key] = tile_table(query_lens, tok_per_tile, device)
    return cache[key]


@dataclass
class RopeInputs:
    """What kernels/rope_kv.py's `rope_and_write_kv` takes besides the QKV output and the cache, for
    `paged_attention(..., rope=...)`."""

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rope: bool = True
    qk_norm_eps: float | None = None
    temperature: tuple[float, float] | None = None


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, query_lens: list[int], block_size: int, scale: float,
                    k_scale: float = 1.0, v_scale: float = 1.0, tiles: tuple | None = None,
                    launch: dict | None = None, out_scale: torch.Tensor | None = None,
                    num_splits: int | None = None, chunk_size: int = 0, sliding_window: int = 0,
                    rope: RopeInputs | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; kv_cache: [2, slots, Hkv, D] -> out [T, Hq, D] (q's dtype, or FP8 with `out_scale`).
    `chunk_size` (chunked local attention) or `sliding_window`: 0 = global causal.

    With `rope`, q is the QKV projection's output [T, (Hq + 2 Hkv) * D]: RoPE and the KV write happen first,
    inside the attention kernel for split decode steps (the split that holds a request's own position writes its
    key and value before reading keys; LLAMASERVE_ATTN_FUSED_ROPE=0 turns it off), else by rope_and_write_kv."""
    if chunk_size and sliding_window:
        raise ValueError("give chunk_size or sliding_window, not both")
    num_kv_heads = kv_cache.shape[2]
    if rope is not None:
        head_dim = kv_cache.shape[3]
        num_q_heads = q.shape[1] // head_dim - 2 * num_kv_heads
    else:
        _, num_q_heads, head_dim = q.shape
    t = q.shape[0]
    group = num_q_heads // num_kv_heads
    launch = dict(launch or {})  # tuning overrides: BLOCK_M (prefill), BLOCK_N, num_warps, num_stages
    block_m, tok_per_tile = tile_shape(group, query_lens, launch.pop("BLOCK_M", None))
    tile_req, tile_tok = tiles if tiles is not None else step_tiles({}, query_lens, group, q.device, block_m)
    out = torch.empty((t, num_q_heads, head_dim), dtype=torch.float8_e4m3fn if out_scale is not None else q.dtype,
                      device=q.device)
    decode = max(query_lens, default=1) == 1
    n_tiles = tile_req.numel()
    if num_splits is None:
        num_splits = num_splits_for(n_tiles * num_kv_heads, max(query_lens, default=1))
    fuse_rope = (rope is not None and decode and num_splits > 1 and not head_dim & (head_dim - 1)
                 and os.environ.get("LLAMASERVE_ATTN_FUSED_ROPE", "1") != "0")
    if rope is not None and not fuse_rope:
        q = rope_kv.rope_and_write_kv(q, rope.positions, rope.cos, rope.sin, kv_cache, rope.slot_mapping,
                                      num_q_heads, num_kv_heads, head_dim, k_scale, v_scale, rope.rope,
                                      rope.qk_norm_eps, rope.temperature)
    elif fuse_rope:
        assert q.stride(1) == 1 and kv_cache.is_contiguous() and rope.cos.is_contiguous()
        q = q.view(t, num_q_heads + 2 * num_kv_heads, head_dim)
    if n_tiles == 0:
        return out
    k, v = kv_cache[0], kv_cache[1]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    counters = split_counters(q.device, n_tiles * num_kv_heads) if num_splits > 1 else None
    # defaults from the H200 sweeps: decode is bandwidth-bound (benchmarks/kernels_bench.py, SWEEP=1; bf16 KV:
    # 64-key tiles, 4 warps, 2 stages; FP8 KV: 32-key tiles, 1 warp, 3 stages, but 64-key tiles, 2 warps,
    # 3 stages for a query group that is not a power of two (Llama 4's 5): whole steps at batch 128 and ~1,550
    # tokens, benchmarks/decode_variants.py: Scout 35.6 ms against 37.7 with 32 x 1 x 3 (batch 64: 30.4 against
    # 33.6), while Llama-3.1-8B (group 4) ran 7.2 against 7.6-7.8 ms and Llama-3.3-70B (group 8) 32.9 against
    # 34.0-34.3 with 32 x 1 x 3; docs/performance.md), except split FP8 decodes merged
    # in the kernel (batch 1 of Llama 4 Scout, benchmarks/decode_bench.py: 64-key tiles, 8 warps: 7.4 / 8.7 us at
    # 256 / 2,048 tokens against 11.2 / 15.3 with 1 warp and the combine kernel); prefill: 128 x 128 tiles,
    # 8 warps, 3 stages
    if decode and fp8 and counters is not None:
        block_n, warps, stages = 64, 8, 3
    elif decode and fp8:
        block_n, warps, stages = (64, 2, 3) if group & (group - 1) else (32, 1, 3)
    elif decode:
        block_n, warps, stages = 64, 4, 2
    else:
        block_n, warps, stages = 128, 8, 3
    if head_dim > 128 or q.dtype == torch.float32:  # keep K/V stages within shared memory (232 KB on H100/H200)
        block_n, stages = min(block_n, 32), min(stages, 2)
    if decode and counters is None:  # unsplit decode (wide batches): LLAMASERVE_ATTN_DECODE_LAUNCH, an A/B switch
        block_n, warps, stages = launch_from_env("LLAMASERVE_ATTN_DECODE_LAUNCH", (block_n, warps, stages),
                                                 "BLOCK_NxWARPSxSTAGES")
    launch.setdefault("num_warps", warps)
    launch.setdefault("num_stages", stages)
    block_n = launch.pop("BLOCK_N", block_n)
    block_d = triton.next_power_of_2(head_dim)
    part = part_ml = q  # unused without splits
    if num_splits > 1:
        part = torch.empty((n_tiles * num_kv_heads * num_splits * block_m, block_d), dtype=torch.float32,
                           device=q.device)
        part_ml = torch.empty((n_tiles * num_kv_heads * num_splits * block_m, 2), dtype=torch.float32,
                              device=q.device)
    grid = (n_tiles, num_kv_heads, num_splits)
    sparse = os.environ.get("LLAMASERVE_ATTN_SPARSE_MERGE", "1") != "0"
    _paged_attn_kernel[grid](
        q, k, v, out, out_scale if out_scale is not None else q, part, part_ml,
        counters if counters is not None else seq_lens, block_tables, seq_lens,
        query_start_loc, tile_req, tile_tok,
        scale, k_scale, v_scale, chunk_size or sliding_window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, TOK_PER_TILE=tok_per_tile, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE=block_size, FP8=fp8,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact; tf32 is unused for 16-bit
        HAS_OUT_SCALE=out_scale is not None, NUM_SPLITS=num_splits,
        LOCAL=1 if chunk_size else 2 if sliding_window else 0, FUSED_COMBINE=counters is not None,
        SPARSE_MERGE=sparse, EARLY=early_loads(), **pdl_args(q.device),
        **(_rope_args(rope, num_q_heads, num_kv_heads) if fuse_rope else {}),
        **launch,
    )
    if num_splits > 1 and counters is None:
        _combine_kernel[(n_tiles, num_kv_heads)](
            part, part_ml, out, out_scale if out_scale is not None else q, q, query_start_loc, tile_req, tile_tok,
            out.stride(0), out.stride(1), GROUP=group, TOK_PER_TILE=tok_per_tile, BLOCK_M=block_m,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, HAS_OUT_SCALE=out_scale is not None,
            SPARSE_MERGE=sparse)
    return out


def _rope_args(rope: RopeInputs, num_q_heads: int, num_kv_heads: int) -> dict:
    floor_scale, attn_scale = rope.temperature or (1.0, 0.0)
    return dict(Pos=rope.positions, Slots=rope.slot_mapping, Cos=rope.cos, Sin=rope.sin,
                stride_cos=rope.cos.stride(0), eps=rope.qk_norm_eps or 0.0, floor_scale=floor_scale,
                attn_scale=attn_scale, HQ=num_q_heads, HKV=num_kv_heads, FUSED_ROPE=True, ROPE=rope.rope,
                NORM=rope.qk_norm_eps is not None, TEMP=rope.temperature is not None)
