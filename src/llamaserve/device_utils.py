"""Host -> device copies that never make the host wait for the GPU.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory, which blocks the host until the
stream reaches the copy, i.e. until the GPU has finished everything queued before it. That would undo overlap
scheduling. `h2d` stages through pinned memory and copies asynchronously; PyTorch's pinned-memory cache keeps a
staging buffer alive until its copy has run, so it is safe to call every step.
"""

from __future__ import annotations

from typing import Any

import torch


def h2d(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list / nested list / numpy array / CPU tensor as a tensor on `device`, without a host sync."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=dtype)
    t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers: a captured CUDA graph may still use them


def arrival_counters(device: torch.device, key: str, n: int) -> torch.Tensor | None:
    """At least `n` zeroed int32 counters for a kernel whose last-arriving program finishes the work (split-KV
    attention's merge, kernels/paged_attention.py); such kernels leave them zero, so one buffer per (device, key)
    serves every launch on a stream. Made outside CUDA-graph capture (the warm-up run before a capture makes it);
    None while capturing without one (the caller then takes its unfused path)."""
    buf = _COUNTERS.get((device, key))
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[(device, key)] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return buf
