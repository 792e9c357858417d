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
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - older Triton: pdl_args() is empty, so gdc_wait is never traced
    gdc_wait = None

__all__ = ["gdc_wait", "pdl_args"]


def pdl_args(device: torch.device) -> dict:
    """{"PDL": True, "launch_pdl": True} when the device can and LLAMASERVE_PDL is not 0; else {}."""
    if os.environ.get("LLAMASERVE_PDL", "1") == "0" or gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return {}
    return {"PDL": True, "launch_pdl": True}
