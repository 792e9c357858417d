"""Triton sampling kernel: greedy and temperature sampling by the Gumbel-max trick, one program per row.

argmax_v(logit_v / T + g_v), g_v = -log(-log(u_v)) with u_v uniform, draws v with probability softmax(logit / T)
(the same law as the exponential race the torch sampler uses). The uniforms come from Philox in the kernel,
keyed by a per-row 31-bit `seed` that the host derives from (request seed or the engine's RNG, output index),
so a seeded request's draws depend on nothing else in the batch, and nothing is copied back to the host. Rows
with T = 0 take the plain argmax. Masked logits (-inf, from top-k / top-p / min-p / banned tokens) never win.
Ties go to the lowest token id, like torch.argmax.
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
