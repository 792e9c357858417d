"""Triton kernels. Each has its PyTorch reference (in layers/) and a test on fresh random inputs, which also runs on
the CPU under TRITON_INTERPRET=1 (set before triton is imported, see tests/kernels/conftest.py)."""

from __future__ import annotations

import os


def launch_from_env(name: str, default: tuple[int, ...], fields: str) -> tuple[int, ...]:
    """A kernel's launch parameters from the environment variable `name`: `fields` names them joined by "x" (e.g.
    "BLOCK_NxBLOCK_KxWARPSxSTAGES"), the value gives as many positive integers the same way (64x512x4x4); unset or
    empty, `default`. For sweeps inside a whole model step (benchmarks/decode_variants.py)."""
    env = os.environ.get(name)
    if not env:
        return default
    try:
        values = tuple(int(v) for v in env.split("x"))
        if len(values) != len(default) or min(values) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{name}={env!r}: expected {fields} (positive integers), e.g. "
                         f"{'x'.join(map(str, default))}") from None
    return values

