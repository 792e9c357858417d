"""L2 prefetch of a weight from inside a latency-bound kernel (Hopper's `cp.async.bulk.prefetch.L2`).

At batch 1 a decode layer alternates weight streams (qkv, o, the experts) with short kernels that move almost no
bytes (the norms, attention, the router); HBM idles while those run. `prefetch_l2(P, nbytes, pid, nprog, ...)`
lets such a kernel ask the copy engine to bring the next GEMM's weight (a flat byte range) into L2: each of its
`nprog` programs issues every `nprog`-th CHUNK-byte piece, fire and forget (no wait, no registers, no shared
memory), and the GEMM that follows finds those bytes in L2. Only sm_90+ has the instruction, and Triton's CPU
interpreter runs no inline assembly, so callers guard it with a constexpr (`prefetch_enabled`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4: programmatic dependent launch (griddepcontrol)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: pdl_enabled() is False, so neither is ever traced
    gdc_launch_dependents = gdc_wait = None

PF_CHUNK = tl.constexpr(16384)  # bytes per bulk prefetch instruction
_ASM = tl.constexpr("{ .reg .pred p; setp.gt.s32 p, $2, 0; "
                    "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }")


@triton.jit
def prefetch_l2(P, nbytes, pid, nprog, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Prefetch bytes [0, nbytes) from P (16-byte aligned) into L2: this program's share, pieces pid, pid + nprog,
    ... (BLOCK >= the pieces per program). Pieces past the end are skipped; the last one is cut to a multiple of
    16 bytes."""
    idx = pid + nprog * tl.arange(0, BLOCK)
    start = idx.to(tl.int64) * CHUNK
    size = (tl.minimum(tl.maximum(nbytes - start, 0), CHUNK) & -16).to(tl.int32)
    ptrs = P.to(tl.pointer_type(tl.uint8)) + start
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_enabled(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0+ outside the interpreter, unless LLAMASERVE_L2_PREFETCH=0."""
    if os.environ.get("LLAMASERVE_L2_PREFETCH", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch with an L2 prefetch before the wait: `prefetch_enabled` and a Triton that
    has griddepcontrol, unless LLAMASERVE_PDL=0."""
    return (gdc_wait is not None and os.environ.get("LLAMASERVE_PDL", "1") != "0"
            and prefetch_enabled(device))


def block_for(nbytes: int, chunk: int, programs: int) -> int:
    """The BLOCK that covers nbytes in CHUNK pieces over `programs` programs."""
    return max(32, triton.next_power_of_2(triton.cdiv(triton.cdiv(nbytes, chunk), programs)))
