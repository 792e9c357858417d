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

PREFETCH_PROGRAMS = 64  # half the SMs: attention's programs keep the rest
_STREAMS: dict[int, torch.cuda.Stream] = {}
_SINKS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _l2_prefetch_kernel(W, Sink, n, per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    start = pid * per_program
    for i in range(0, per_program, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        acc ^= tl.load(W + offs, mask=(offs < n) & (i + tl.arange(0, BLOCK) < per_program), other=0,
                       eviction_policy="evict_last")
    tl.store(Sink + pid, tl.xor_sum(acc, axis=0))


def l2_checksum(w: torch.Tensor, programs: int = PREFETCH_PROGRAMS, sink: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Read `w` (contiguous, a multiple of 4 bytes) through L2 with evict_last; returns the per-program XOR of its
    32-bit words ([programs] int32)."""
    words = w.reshape(-1).view(torch.int32)
    n = words.numel()
    sink = sink if sink is not None else torch.empty(programs, dtype=torch.int32, device=w.device)
    block = 2048
    per_program = triton.cdiv(triton.cdiv(n, programs), block) * block
    _l2_prefetch_kernel[(programs,)](words, sink, n, per_program, BLOCK=block, num_warps=4)
    return sink


def prefetch_l2(w: torch.Tensor) -> Callable[[], None] | None:
    """Start reading `w` into L2 on a side stream (CUDA, LLAMASERVE_L2_PREFETCH=1); returns the join to call on
    the main stream before the end of the step (a CUDA graph needs every forked stream joined), or None."""
    if w.device.type != "cuda" or os.environ.get("LLAMASERVE_L2_PREFETCH", "0") != "1":
        return None
    index = w.device.index if w.device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    if w.device not in _SINKS:
        _SINKS[w.device] = torch.empty(PREFETCH_PROGRAMS, dtype=torch.int32, device=w.device)
    side, main = _STREAMS[index], torch.cuda.current_stream(w.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        l2_checksum(w, sink=_SINKS[w.device])
    return lambda: main.wait_stream(side)
