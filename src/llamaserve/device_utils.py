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
