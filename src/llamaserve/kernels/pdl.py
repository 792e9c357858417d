"""Programmatic dependent launch (PDL) for the short kernels of a decode step.

At batch 1 a Scout layer is a chain of about ten kernels, and each boundary costs the GPU 0.4-1.5 us: the next
kernel launches only once the previous one has finished and flushed. Launched as a programmatic dependent
(`launch_pdl=True`, Hopper+), a kernel's programs may start while the previous kernel's last programs still run;
they first read what the previous kernel did not write (metadata, weights, caches), then `gdc_wait()` until it
has completed and its writes are visible, then read its outputs. Inside a CUDA graph the launch becomes a
programmatic edge. `pdl_args(device)` gives the launch arguments (the kernel's PDL constexpr and `launch_pdl`),
or nothing: off the GPU, under Triton's CPU interpreter, before compute capability 9.0, with a Triton without
griddepcontrol, or when LLAMASERVE_PDL=0.

Used by the latency-bound kernels of a decode layer: the RMSNorm, split decode attention (after the cuBLAS qkv
GEMM), the norm + router kernel (after the cuBLAS o GEMM) and the MoE routing kernel. H200, batch-1 Scout FP8,
one model load (benchmarks/decode_variants.py, 2026-12-01): 5.444 / 5.437 ms per step against 5.476 / 5.471
without. The decode GEMMs as programmatic dependents too measured slower (5.506 ms: their early programs hold
SMs the running GEMM's stream wants), as did PDL with an L2 prefetch before the wait (docs/performance.md).
"""

from __future__ import annotations

import os

import torch

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: pdl_args() is empty and trigger_early() False
    # (it asks pdl_args), so neither is ever traced
    gdc_launch_dependents = gdc_wait = None

__all__ = ["early_loads", "gdc_launch_dependents", "gdc_wait", "gemv_pdl", "gemv_trigger", "pdl_args",
           "trigger_early"]


def early_loads() -> bool:
    """Decode kernels load what no earlier kernel writes (weights, scales, block tables) first, before their PDL
    wait or their weight loop, instead of where the arithmetic needs it (the norms: after the row's statistics,
    behind the reduction's CTA barriers; split attention: its FP8 output scale after the merge, its first key
    tile's block-table entries after q; the decode MoE GEMMs: their FP8 scales after the weight loop). Same values,
    same results. LLAMASERVE_EARLY_LOADS=0: the old order (an A/B switch)."""
    return os.environ.get("LLAMASERVE_EARLY_LOADS", "1") != "0"


def trigger_early(device: torch.device) -> bool:
    """Whether a kernel calls `gdc_launch_dependents()` at its start, so that its programmatic dependent (launched
    with PDL) may launch as soon as every program of this one has started, and run the part before its
    `gdc_wait` (metadata, tables, weights) beside this kernel. Needs what `pdl_args` needs;
    LLAMASERVE_PDL_TRIGGER=0 turns it off (an A/B switch). Used by the routed down GEMM of a decode MoE step (its
    dependent: the next layer's input norm), norm + router (the routing kernel) and the one-token FP8 GEMVs
    (`gemv_trigger`)."""
    return bool(pdl_args(device)) and os.environ.get("LLAMASERVE_PDL_TRIGGER", "1") != "0"


def gemv_trigger(device: torch.device) -> bool:
    """`trigger_early` for the one-token FP8 GEMVs (kernels/gemv.py: qkv before split attention, o before norm +
    router) unless LLAMASERVE_GEMV_TRIGGER=0: their PDL dependents launch beside their last programs and load
    metadata, RoPE tables and router weights there (Scout FP8 batch 1 on an H200, 2026-12-01, one load: 5.041
    against 5.174 ms per step; docs/performance.md)."""
    return os.environ.get("LLAMASERVE_GEMV_TRIGGER", "1") != "0" and trigger_early(device)


def gemv_pdl(device: torch.device) -> dict:
    """`pdl_args` for the one-token weight GEMVs (kernels/gemv.py's FP8 linears, the routed down GEMV) unless
    LLAMASERVE_GEMV_PDL=0: each launches as a programmatic dependent of the kernel before it and waits
    (`gdc_wait`) before its first load, so it starts as that kernel ends without the launch gap; the kernels
    before them (the input norm, attention, the decode GEMM gate-ups) do not trigger early, so no GEMV program
    waits on an SM. Scout FP8 batch 1 on an H200 (2026-12-01, one load): 4.957 against 4.981 / 4.979 ms per
    step; `bench latency` 4.951 against 4.971. (With early triggers and weight slices loaded before the wait it
    had not gained: docs/performance.md.)"""
    return pdl_args(device) if os.environ.get("LLAMASERVE_GEMV_PDL", "1") != "0" else {}


def pdl_args(device: torch.device) -> dict:
    """{"PDL": True, "launch_pdl": True} when the device can and LLAMASERVE_PDL is not 0; else {}."""
    if os.environ.get("LLAMASERVE_PDL", "1") == "0" or gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return {}
    return {"PDL": True, "launch_pdl": True}
