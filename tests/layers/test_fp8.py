"""FP8 W8A8 linear layers against the dequantize-and-matmul reference, fused-shard scales, online and dummy FP8
models end to end (teacher-forced greedy agreement with the unquantized model)."""

from __future__ import annotations

import pytest
import torch

from llamaserve import LLM, SamplingParams
from llamaserve.kernels.pdl import pdl_args
from llamaserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from llamaserve.layers.quantization import FP8, QuantConfig, dynamic_scale, quantize_fp8, reference_fp8_linear
from tests.conftest import LONG_TEXT
from tests.models.test_llama_parity import prefill_logits


@pytest.mark.parametrize("static", [True, False])
def test_fp8_linear_matches_reference(static):
    torch.manual_seed(1)
    layer = RowParallelLinear(96, 48, False, torch.float32, QuantConfig(static_input_scales=static))
    w = torch.randn(48, 96) * 0.1
    layer.weight.weight_loader(layer.weight, w)  # online: quantized with its own scale
    if static:
        layer.input_scale.weight_loader(layer.input_scale, torch.tensor(0.01))
    layer.finalize()
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == ()
    torch.testing.assert_close(layer.weight.float() * layer.weight_scale, w, rtol=0.07, atol=1e-3)
    x = torch.randn(5, 96)
    sx = torch.tensor(0.01) if static else dynamic_scale(x)
    want = reference_fp8_linear(quantize_fp8(x, sx), sx, layer.weight, layer.weight_scale, None, torch.float32)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    if static:  # an input quantized upstream (by the fused norm / SiLU) gives the same result
        torch.testing.assert_close(layer(quantize_fp8(x, layer.static_input_scale)), want, rtol=1e-4, atol=1e-4)
    assert (layer(x) - x @ w.t()).norm() / (x @ w.t()).norm() < 0.1  # and FP8 is close to the float matmul


def test_fused_layers_share_one_scale():
    """q/k/v (and gate/up) shards arrive with their own scales; after finalize one scale serves the whole weight."""
    torch.manual_seed(2)
    qkv = QKVParallelLinear(64, 16, 4, 2, False, torch.float32, QuantConfig())
    parts = {"q": torch.randn(64, 64) * 0.02, "k": torch.randn(32, 64) * 0.5, "v": torch.randn(32, 64) * 3}
    for sid, w in parts.items():
        s = dynamic_scale(w)
        qkv.weight.weight_loader(qkv.weight, quantize_fp8(w, s), sid)  # a ModelOpt checkpoint: FP8 + scale
        qkv.weight_scale.weight_loader(qkv.weight_scale, s, sid)
        qkv.input_scale.weight_loader(qkv.input_scale, torch.tensor({"q": 0.01, "k": 0.03, "v": 0.02}[sid]), sid)
    qkv.finalize()
    assert qkv.weight_scale.shape == () and qkv.input_scale.item() == pytest.approx(0.03)
    assert qkv.weight_scale.item() == pytest.approx(dynamic_scale(parts["v"]).item())
    full = torch.cat(list(parts.values()))
    got = qkv.weight.float() * qkv.weight_scale
    for (offset, size), w in zip(qkv.shard_slices(), parts.values()):
        # re-quantized to the larger scale: the absolute error is bounded by that scale's step
        err = (got[offset:offset + size] - w).abs().max()
        assert err <= qkv.weight_scale * 16 + 0.07 * w.abs().max(), (offset, err)
    x = torch.randn(3, 64)
    rel = (qkv(x) - x @ full.t()).norm() / (x @ full.t()).norm()
    assert rel < 0.1
    gate_up = MergedColumnParallelLinear(64, [40, 40], False, torch.float32, QuantConfig(static_input_scales=False))
    assert gate_up.input_scale is None and gate_up.weight_scale.shape == (2,)
    assert gate_up.shard_slices() == [(0, 40), (40, 40)]


def test_excluded_modules_stay_unquantized():
    qc = QuantConfig()
    assert qc.linear_method("lm_head") is None
    assert qc.linear_method("model.layers.0.mlp.down_proj") is not None


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def test_online_fp8_smollm2_agrees_with_float32():
    """vLLM-style `--quantization fp8` on a float checkpoint: weights per tensor at load, dynamic activations.
    Teacher-forced greedy tokens agree with the float32 model on >= 95% of positions (the issue's bar)."""
    ref = LLM(None, max_seq_len=1024, num_kv_blocks=64)
    fp8 = LLM(None, max_seq_len=1024, num_kv_blocks=64, quantization="fp8")
    layer = fp8.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8 and layer.self_attn.qkv_proj.input_scale is None
    assert fp8.engine.runner.model.lm_head.weight.dtype == torch.float32  # lm_head excluded, as ModelOpt does
    ids = ref.tokenizer.encode(LONG_TEXT * 3)
    assert _agreement(prefill_logits(ref, ids), prefill_logits(fp8, ids)) >= 0.95
    params = SamplingParams(max_tokens=8, temperature=0)
    out = fp8.generate(["The capital of France is"], params)[0].outputs[0].text
    assert "Paris" in out


def test_dummy_fp8_calibrated_and_agrees_with_dequantized(tiny_llama_dir):
    """Dummy FP8 weights get calibrated static input scales; the model agrees with the same weights dequantized."""
    kw = dict(load_format="dummy", max_seq_len=512, num_kv_blocks=64, max_num_tokens=128)
    fp8 = LLM(str(tiny_llama_dir), quantization="fp8", **kw)
    ref = LLM(str(tiny_llama_dir), **kw)
    qm, rm = fp8.engine.runner.model, ref.engine.runner.model
    qkv = qm.model.layers[1].self_attn.qkv_proj
    assert qkv.input_scale is not None and 0 < qkv.input_scale.item() < 0.1  # calibrated, not the initial 1.0
    assert qkv.weight_scale.item() == pytest.approx(64**-0.5 / 448)  # uniform(+-1/sqrt(fan_in))
    with torch.no_grad():
        for (_, q), (_, r) in zip(qm.named_modules(), rm.named_modules()):
            if hasattr(q, "weight_scale"):
                r.weight.copy_(q.weight.float() * q.weight_scale)
            elif isinstance(getattr(q, "weight", None), torch.nn.Parameter):
                r.weight.copy_(q.weight)
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    a, b = prefill_logits(ref, ids), prefill_logits(fp8, ids)
    assert (a - b).norm() / a.norm() < 0.1
    # argmax agreement: bf16 logits (CUDA) of a random tiny model hold many near-ties, so its bound is looser
    # (0.895 measured on an H200, 2026-12-01) than float32's (the CPU run)
    assert _agreement(a, b) >= (0.9 if rm.lm_head.weight.dtype == torch.float32 else 0.85)


def test_small_m_mode_is_checked(monkeypatch):
    from llamaserve.layers.quantization import small_m_mode

    monkeypatch.delenv("LLAMASERVE_FP8_SMALL_M", raising=False)
    assert small_m_mode() == "auto"
    monkeypatch.setenv("LLAMASERVE_FP8_SMALL_M", "cutlass")
    with pytest.raises(ValueError, match="LLAMASERVE_FP8_SMALL_M='cutlass': expected one of auto, cublas, gemv"):
        small_m_mode()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-token dispatch is CUDA-only (the GEMV kernel itself "
                    "is tested on the CPU in tests/kernels/test_gemv.py)")
def test_one_token_gemv_dispatch(monkeypatch):
    """A marked layer's one-row call takes kernels/gemv.py, an unmarked one's or a two-row call cuBLAS; all match the
    reference. LLAMASERVE_FP8_SMALL_M=cublas turns the GEMV off, =gemv on for every layer; the GEMV multiplies in
    float16 unless LLAMASERVE_FP8_GEMV_HALF=0, and calls `gdc_launch_dependents` first unless
    LLAMASERVE_GEMV_TRIGGER=0 (where PDL runs). (320 outputs: cuBLAS's FP8 GEMM wants both dimensions divisible by
    16.)"""
    from llamaserve.kernels import gemv

    torch.manual_seed(2)
    layer = RowParallelLinear(512, 320, False, torch.bfloat16, QuantConfig(static_input_scales=True)).cuda()
    layer.weight.weight_loader(layer.weight, torch.randn(320, 512) * 0.1)
    layer.input_scale.weight_loader(layer.input_scale, torch.tensor(0.01))
    layer.finalize()
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: calls.append((a[0].shape[0], k["half"], k["trigger"]))
                        or real(*a, **k))
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    sx = layer.static_input_scale
    pdl = bool(pdl_args(x.device))  # the GEMV lets its PDL dependent launch early where PDL runs
    for rows, marked, mode, half, want_calls in (
            (1, True, "auto", None, [(1, True, pdl)]), (2, True, "auto", None, []), (1, False, "auto", None, []),
            (1, True, "cublas", None, []), (1, False, "gemv", None, [(1, True, pdl)]),
            (1, True, "auto", "0", [(1, False, pdl)]), (1, True, "auto", "no-trigger", [(1, True, False)]),
            (1, True, "auto", "pdl", [(1, True, pdl)])):
        calls.clear()
        monkeypatch.setenv("LLAMASERVE_GEMV_TRIGGER", "0" if half == "no-trigger" else "1")
        monkeypatch.setenv("LLAMASERVE_GEMV_PDL", "1" if half == "pdl" else "0")  # launched as a PDL dependent
        half = None if half in ("no-trigger", "pdl") else half
        monkeypatch.setenv("LLAMASERVE_FP8_SMALL_M", mode)
        if half is None:  # float16 products by default; LLAMASERVE_FP8_GEMV_HALF=0: float32
            monkeypatch.delenv("LLAMASERVE_FP8_GEMV_HALF", raising=False)
        else:
            monkeypatch.setenv("LLAMASERVE_FP8_GEMV_HALF", half)
        layer.one_token_gemv = marked
        want = reference_fp8_linear(quantize_fp8(x[:rows], sx), sx, layer.weight, layer.weight_scale, None,
                                    torch.bfloat16)
        torch.testing.assert_close(layer(x[:rows]).float(), want.float(), rtol=2e-2, atol=2e-2)
        assert calls == want_calls, (rows, marked, mode)
