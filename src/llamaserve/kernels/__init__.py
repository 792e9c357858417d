"""Triton kernels. Each has its PyTorch reference (in layers/) and a test on fresh random inputs, which also runs on
the CPU under TRITON_INTERPRET=1 (set before triton is imported, see tests/kernels/conftest.py)."""
