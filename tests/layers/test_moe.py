"""layers/moe.py: the padded expert-weight storage."""

from __future__ import annotations

import pytest
import torch

from llamaserve.layers.moe import FusedExperts, expert_weight


@pytest.mark.parametrize("k,n,dtype", [(8192, 40, torch.float8_e4m3fn), (5120, 24, torch.float8_e4m3fn),
                                       (64, 96, torch.float32), (48, 8, torch.bfloat16)])
def test_expert_weight_rows_are_odd_multiples_of_128_bytes(k, n, dtype):
    w = expert_weight(3, k, n, dtype)
    assert w.shape == (3, k, n) and w.stride(1) == 1
    row_bytes = w.stride(2) * w.element_size()
    assert w.stride(2) >= k and row_bytes % 128 == 0 and (row_bytes // 128) % 2 == 1
    src = torch.randn(3, k, n).to(dtype)
    w.copy_(src)  # loading copies through the transposed, padded view
    assert torch.equal(w.float(), src.float())


def test_fused_experts_store_padded_weights():
    experts = FusedExperts(4, 64, 32, torch.float32)
    assert experts.gate_up_proj.shape == (4, 64, 64) and experts.down_proj.shape == (4, 32, 64)
    assert experts.down_proj.stride(2) * 4 % 256 == 128  # 32 floats = 128 bytes: one unit, already odd
    assert experts.gate_up_proj.stride(2) == 96  # 64 floats = 256 bytes -> 384
