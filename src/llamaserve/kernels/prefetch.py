"""Pull a weight into the GPU's L2 cache ahead of its GEMM, on a side stream, while the main stream runs
latency-bound kernels (Llama 4 at decode: o_proj's 26 MB during RoPE and attention, which move a few hundred KB).

`_l2_prefetch_kernel` reads the tensor as 32-bit words with the `evict_last` cache policy and stores one XOR
checksum per program (a real result, so the loads are not optimized away, and what the test checks against
torch). H100/H200 L2 holds 50 MB, so a prefetched matrix must stay well under that.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 4096  # 16 KB per program, one load each: a copy-like grid that streams at HBM speed
_STREAMS: dict[int, torch.cuda.Stream] = {}
_SINKS: dict[tuple[torch.device, int], torch.Tensor] = {}


@triton.jit
def _l2_prefetch_kernel(W, Sink, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(W + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(Sink + pid, tl.xor_sum(words, axis=0))


def l2_checksum(w: torch.Tensor, block: int = BLOCK_WORDS, sink: torch.Tensor | None = None) -> torch.Tensor:
    """Read `w` (contiguous, a multiple of 4 bytes) through L2 with evict_last, `block` 32-bit words per program;
    returns each program's XOR of its words ([cdiv(words, block)] int32)."""
    words = w.reshape(-1).view(torch.int32)
    n = words.numel()
    programs = triton.cdiv(n, block)
    sink = sink if sink is not None else torch.empty(programs, dtype=torch.int32, device=w.device)
    _l2_prefetch_kernel[(programs,)](words, sink, n, BLOCK=block, num_warps=4)
    return sink


def prefetch_l2(w: torch.Tensor) -> Callable[[], None] | None:
    """Start reading `w` into L2 on a side stream (CUDA, LLAMASERVE_L2_PREFETCH=1); returns the join to call on
    the main stream before the end of the step (a CUDA graph needs every forked stream joined), or None."""
    if w.device.type != "cuda" or os.environ.get("LLAMASERVE_L2_PREFETCH", "0") != "1":
        return None
    index = w.device.index if w.device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    programs = triton.cdiv(w.numel() * w.element_size() // 4, BLOCK_WORDS)
    key = (w.device, programs)
    if key not in _SINKS:
        _SINKS[key] = torch.empty(programs, dtype=torch.int32, device=w.device)
    side, main = _STREAMS[index], torch.cuda.current_stream(w.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        l2_checksum(w, sink=_SINKS[key])
    return lambda: main.wait_stream(side)
