"""NVFP4 packing and quantization (ModelOpt's rules), the NVFP4 linear method's loaders (checkpoint shards, online
quantization, fused shards with their own global scales), and the ModelOpt config that selects it."""

from __future__ import annotations

import json

import pytest
import torch

from llamaserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from llamaserve.layers.nvfp4 import (
    FP8,
    Nvfp4LinearMethod,
    dequantize_nvfp4,
    e2m1_table,
    pack_e2m1,
    quantize_nvfp4,
    round_to_e2m1,
    unpack_e2m1,
)
from llamaserve.layers.quantization import QuantConfig, modelopt_config


def test_e2m1_table_and_rounding_are_exact():
    assert e2m1_table().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    table = e2m1_table()
    for code in range(16):
        assert table[round_to_e2m1(table[code : code + 1]).long()].item() == table[code].item()
    # halfway points round to the even code (ModelOpt's _cast_fp4), beyond 6 saturates
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01, 7.0, 100.0, -0.75, -5.5])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, 6.0, 6.0, -1.0, -6.0]
    assert table[round_to_e2m1(x).long()].tolist() == want


def test_low_nibble_is_the_even_element():
    packed = torch.tensor([[0x2F] * 8], dtype=torch.uint8)  # byte 0x2F: low nibble 0xF (-6), high nibble 0x2 (1.0)
    assert unpack_e2m1(packed)[0, :2].tolist() == [0xF, 0x2]
    w = dequantize_nvfp4(packed, torch.tensor([[0.5]]).to(FP8), torch.tensor(2.0))
    assert w[0, :4].tolist() == [-6.0, 1.0, -6.0, 1.0]
    assert pack_e2m1(torch.tensor([0xF, 0x2, 0x1, 0x9])).tolist() == [0x2F, 0x91]


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (7, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert torch.equal(unpack_e2m1(packed), codes)


def test_quantize_follows_modelopt_and_bounds_the_error():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=gen) * torch.rand(48, 1, generator=gen) * 3
    w[3, 16:32] = 0  # an all-zero block gets scale 1.0
    packed, scale, g = quantize_nvfp4(w)
    assert packed.shape == (48, 64) and scale.shape == (48, 8) and scale.dtype == FP8 and g.shape == ()
    assert g.item() == pytest.approx(w.abs().max().item() / (6 * 448))
    block_amax = w.reshape(48, 8, 16).abs().amax(-1)
    want_scale = torch.where(block_amax == 0, torch.ones_like(block_amax), block_amax / 6 / g).to(FP8)
    assert torch.equal(scale.float(), want_scale.float())
    deq = dequantize_nvfp4(packed, scale, g)
    step = (scale.float() * g).repeat_interleave(16, dim=1)  # one e2m1 unit: the largest gap (4 -> 6) is 2 units
    assert ((deq - w).abs() <= step + 1e-7).all()
    assert ((deq - w).norm() / w.norm()).item() < 0.15
    assert (deq[3, 16:32] == 0).all()
    # re-quantizing a dequantized weight with its scales reproduces the codes
    packed2, scale2, _ = quantize_nvfp4(deq, g)
    assert torch.equal(dequantize_nvfp4(packed2, scale2, g), deq)


def _ckpt_part(w: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, scale, g = quantize_nvfp4(w)
    return {"weight": packed, "weight_scale": scale, "weight_scale_2": g}


def test_fused_shards_keep_their_global_scales():
    """q/k/v arrive with their own weight_scale_2: after finalize every row dequantizes to its shard's weights
    exactly, and the layer computes x @ W^T with W the dequantized checkpoint weights."""
    gen = torch.Generator().manual_seed(2)
    nvfp4 = QuantConfig("nvfp4")
    qkv = QKVParallelLinear(64, 16, 4, 2, False, torch.float32, nvfp4, "model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv.method, Nvfp4LinearMethod) and qkv.static_input_scale is None
    parts = {"q": torch.randn(64, 64, generator=gen) * 0.02, "k": torch.randn(32, 64, generator=gen) * 0.5,
             "v": torch.randn(32, 64, generator=gen) * 3}
    want = []
    for sid, w in parts.items():
        ck = _ckpt_part(w)
        for name, t in ck.items():
            getattr(qkv, name).weight_loader(getattr(qkv, name), t, sid)
        qkv.input_scale.weight_loader(qkv.input_scale, torch.tensor({"q": 0.01, "k": 0.03, "v": 0.02}[sid]), sid)
        want.append(dequantize_nvfp4(ck["weight"], ck["weight_scale"], ck["weight_scale_2"]))
    qkv.finalize()
    assert qkv.weight_scale_2.shape == (128,) and qkv.input_scale.item() == pytest.approx(0.03)
    full = torch.cat(want)
    assert torch.equal(dequantize_nvfp4(qkv.weight, qkv.weight_scale, qkv.weight_scale_2), full)
    x = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(qkv(x), x @ full.t(), rtol=1e-5, atol=1e-6)


def test_online_quantization_of_float_shards():
    gen = torch.Generator().manual_seed(3)
    quant = QuantConfig("nvfp4", static_input_scales=False, online=True)
    gate_up = MergedColumnParallelLinear(32, [48, 48], False, torch.float32, quant)
    assert gate_up.input_scale is None and gate_up.weight_scale_2.shape == (2,)
    parts = [torch.randn(48, 32, generator=gen), torch.randn(48, 32, generator=gen) * 10]
    for sid, w in enumerate(parts):
        gate_up.weight.weight_loader(gate_up.weight, w, sid)  # bf16/fp32 checkpoint: quantized per shard
    gate_up.finalize()
    want = torch.cat([dequantize_nvfp4(*quantize_nvfp4(w)) for w in parts])
    assert torch.equal(dequantize_nvfp4(gate_up.weight, gate_up.weight_scale, gate_up.weight_scale_2), want)
    down = RowParallelLinear(96, 32, True, torch.float32, quant)
    w = torch.randn(32, 96, generator=gen)
    down.weight.weight_loader(down.weight, w)
    down.bias.weight_loader(down.bias, torch.ones(32))
    down.finalize()
    x = torch.randn(3, 96, generator=gen)
    want = x @ dequantize_nvfp4(*quantize_nvfp4(w)).t() + 1
    torch.testing.assert_close(down(x), want, rtol=1e-5, atol=1e-5)
    assert ((down(x) - (x @ w.t() + 1)).norm() / (x @ w.t()).norm()).item() < 0.15  # 4-bit: about 10%


def test_input_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.*multiple of 16.*exclude_modules"):
        RowParallelLinear(40, 32, False, torch.float32, QuantConfig("nvfp4"), "model.layers.0.mlp.down_proj")


def test_modelopt_config_nvfp4(tmp_path):
    def config(quantization: dict) -> QuantConfig | None:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": quantization}))
        return modelopt_config(tmp_path, {})

    qc = config({"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                 "exclude_modules": ["lm_head", "*.router"]})
    assert qc.method == "nvfp4" and qc.kv_cache_fp8 and qc.static_input_scales and not qc.online
    assert qc.excluded("model.layers.1.feed_forward.router") and not qc.excluded("model.layers.1.mlp.down_proj")
    assert isinstance(qc.linear_method("model.layers.0.mlp.down_proj"), Nvfp4LinearMethod)
    assert qc.linear_method("lm_head") is None
    assert not config({"quant_algo": "W4A16_NVFP4", "group_size": 16}).static_input_scales
    with pytest.raises(ValueError, match="group_size=32.*16"):
        config({"quant_algo": "NVFP4", "group_size": 32})
    with pytest.raises(ValueError, match="INT4_AWQ.*FP8 and NVFP4"):
        config({"quant_algo": "INT4_AWQ", "group_size": 128})
    (tmp_path / "hf_quant_config.json").unlink()  # config.json's quantization_config says the same
    hf = {"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}}
    assert modelopt_config(tmp_path, hf).method == "nvfp4"
    with pytest.raises(ValueError, match="group_size=64"):
        modelopt_config(tmp_path, {"quantization_config": {**hf["quantization_config"], "group_size": 64}})
