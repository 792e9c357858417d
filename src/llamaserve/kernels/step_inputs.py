"""A decode step's inputs, moved from a staging buffer into the CUDA graph's input buffer in one launch.

The CUDA-graph runner (executor/cuda_graphs.py) lays a size-bs step's int64 inputs out as
[token ids | positions | slots | sequence lengths | sampled-row index | block tables] (bs entries each, then
bs x max_blocks). The host copies them into a device staging buffer on a side stream while the previous step
still runs; this kernel, queued on the main stream right before the replay, copies staging -> graph inputs and
puts the previous step's sampled id in place of every token whose sampled-row index is >= 0 (overlap
scheduling's placeholders). The main stream then pays one small kernel between steps instead of a host-to-device
copy (an engine switch each side) and the in-graph fill it replaces. `stage_inputs_torch` is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _stage_inputs_kernel(Src, Dst, Sampled, bs, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    v = tl.load(Src + offs, mask=ok, other=0)
    is_id = offs < bs
    row = tl.load(Src + 4 * bs + offs, mask=is_id, other=-1)
    take = is_id & (row >= 0)
    s = tl.load(Sampled + tl.where(take, row, 0), mask=take, other=0)
    tl.store(Dst + offs, tl.where(take, s, v), mask=ok)


def stage_inputs(src: torch.Tensor, dst: torch.Tensor, sampled: torch.Tensor, bs: int) -> None:
    """dst[:n] = src[:n] (n = src.numel(), int64, contiguous), then dst[t] = sampled[src[4 bs + t]] for token
    t < bs whose sampled-row index src[4 bs + t] is >= 0. One launch."""
    total = src.numel()
    if total:
        _stage_inputs_kernel[(triton.cdiv(total, BLOCK),)](src, dst, sampled, bs, total, BLOCK=BLOCK)


def stage_inputs_torch(src: torch.Tensor, dst: torch.Tensor, sampled: torch.Tensor, bs: int) -> None:
    """The reference of `stage_inputs` (and the CPU path of the graph runner)."""
    n = src.numel()
    dst[:n].copy_(src)
    row = src[4 * bs : 5 * bs]
    dst[:bs] = torch.where(row >= 0, sampled[row.clamp(min=0)], src[:bs])
