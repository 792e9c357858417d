"""Triton sampling kernel: greedy and temperature sampling by the Gumbel-max trick, one program per row.

argmax_v(logit_v / T + g_v), g_v = -log(-log(u_v)) with u_v uniform, draws v with probability softmax(logit / T)
(the same law as the exponential race the torch sampler uses). The uniforms come from Philox in the kernel,
keyed by a per-row 31-bit `seed` that the host derives from (request seed or the engine's RNG, output index),
so a seeded request's draws depend on nothing else in the batch, and nothing is copied back to the host. Rows
with T = 0 take the plain argmax. Masked logits (-inf, from top-k / top-p / min-p / banned tokens) never win.
Ties go to the lowest token id, like torch.argmax.

`greedy_argmax` is the plain greedy step's argmax (no temperature, penalties, bans or logprobs) on the lm_head's
own output dtype, split over the row: torch's argmax of one float32 row of a 202K vocabulary ran as one reduction
kernel of 8.8 us after a 3.8 us float32 cast (H200 timeline, Scout batch 1); here ~50 programs take 4,096 logits
each and a second launch of one program per row picks among their winners. `fill_sampled` writes the previous
step's sampled ids into a decode step's token ids (overlap scheduling's placeholders) in one launch, not torch's
five (clamp, index, compare, where, copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(Logits, Temp, Seeds, Out, stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(Temp + row)
    seed = tl.load(Seeds + row)
    greedy = temp == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(Logits + row.to(tl.int64) * stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, cols)
        u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
        g = -tl.log(-tl.log(u))
        val = tl.where(greedy, x, x * inv_t + g)
        val = tl.where(x == float("-inf"), float("-inf"), val)
        better = (val > best_val) | ((val == best_val) & (cols < best_idx))
        best_val = tl.where(better & ok, val, best_val)
        best_idx = tl.where(better & ok, cols, best_idx)
    m = tl.max(best_val, 0)
    idx = tl.min(tl.where(best_val == m, best_idx, 2147483647), 0)
    tl.store(Out + row, idx.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (masked entries -inf), temperature [B] float32 (0 = greedy), seeds [B] int32 -> ids [B]."""
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        _gumbel_argmax_kernel[(b,)](logits, temperature, seeds, out, logits.stride(0), v, BLOCK=1024)
    return out


ARGMAX_CHUNK = 4096


@triton.jit
def _argmax_chunk_kernel(Logits, PVal, PIdx, stride, V, S, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(Logits + row.to(tl.int64) * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    idx = tl.min(tl.where((x == m) & (cols < V), cols, 2147483647), 0)  # the first largest, as torch.argmax
    tl.store(PVal + row * S + chunk, m)
    tl.store(PIdx + row * S + chunk, idx)


@triton.jit
def _argmax_pick_kernel(PVal, PIdx, Out, S, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_S)
    v = tl.load(PVal + row * S + c, mask=c < S, other=float("-inf"))
    i = tl.load(PIdx + row * S + c, mask=c < S, other=2147483647)
    m = tl.max(v, 0)
    tl.store(Out + row, tl.min(tl.where(v == m, i, 2147483647), 0).to(tl.int64))


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] in any float dtype (no NaN) -> the first largest entry's index per row [B] int64, as
    `logits.float().argmax(-1)` (the cast to float32 is exact, so the same index), in two launches."""
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        s = triton.cdiv(v, ARGMAX_CHUNK)
        val = torch.empty((b, s), dtype=torch.float32, device=logits.device)
        idx = torch.empty((b, s), dtype=torch.int32, device=logits.device)
        _argmax_chunk_kernel[(b, s)](logits, val, idx, logits.stride(0), v, s, BLOCK=ARGMAX_CHUNK, num_warps=8)
        _argmax_pick_kernel[(b,)](val, idx, out, s, BLOCK_S=triton.next_power_of_2(s))
    return out


@triton.jit
def _fill_sampled_kernel(Ids, Rows, Sampled, n, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    r = tl.load(Rows + t, mask=t < n, other=-1)
    take = r >= 0
    s = tl.load(Sampled + tl.where(take, r, 0), mask=take, other=0)
    tl.store(Ids + t, s, mask=take)


def fill_sampled(ids: torch.Tensor, rows: torch.Tensor, sampled: torch.Tensor) -> None:
    """In place: ids[t] = sampled[rows[t]] where rows[t] >= 0 (ids, rows [n] int64, contiguous), one launch."""
    n = ids.numel()
    if n:
        _fill_sampled_kernel[(1,)](ids, rows, sampled, n, BLOCK=triton.next_power_of_2(n))
