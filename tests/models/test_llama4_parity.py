"""Llama 4 text model against transformers' Llama4ForCausalLM in float32: MoE and dense layers interleaved,
chunked local attention with a chunk shorter than the prompts, NoPE layers with temperature tuning, QK-norm,
interleaved RoPE with llama3 scaling (low == high), greedy tokens and logits; the multimodal checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamaserve import LLM, SamplingParams
from tests.models.test_llama_parity import prefill_logits


@pytest.fixture(scope="module")
def tiny_llama4_dir(tmp_path_factory) -> Path:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=16, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 64},
    )
    torch.manual_seed(0)
    model = Llama4ForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama4")
    model.save_pretrained(path)
    return path


def _hf(path: Path):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_layer_pattern(tiny_llama4_dir):
    llm = LLM(str(tiny_llama4_dir), num_kv_blocks=32, max_num_tokens=64)
    layers = llm.engine.runner.model.model.layers
    assert [type(layer.feed_forward).__name__ for layer in layers] == ["LlamaMLP", "Llama4MoE"] * 2
    assert [layer.self_attn.use_rope for layer in layers] == [True, False, True, False]
    assert [layer.self_attn.attn.chunk_size for layer in layers] == [16, 0, 16, 0]
    from llamaserve.layers.linear import LinearBase

    linears = [m for m in layers.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.one_token_gemv for m in linears)  # FP8 one-token calls take the GEMV


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_and_logits_match_transformers(tiny_llama4_dir, backend, monkeypatch):
    from llamaserve.kernels import moe_decode

    fused_calls = []  # the Triton backend's decode steps take the fused post-attention norm + router
    real = moe_decode.norm_router
    monkeypatch.setattr(moe_decode, "norm_router", lambda *a: fused_calls.append(1) or real(*a))
    hf = _hf(tiny_llama4_dir)
    llm = LLM(str(tiny_llama4_dir), num_kv_blocks=48, block_size=8, max_num_tokens=32, kernel_backend=backend)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 20, 45)]  # 45: chunked prefill
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, out in zip(prompts, outs):
        # NOTE: the reference is transformers' full forward, greedy step by step: its `generate` (with its
        # chunked-attention cache) departs from its own full forward on this config after the first token.
        seq = p + out.outputs[0].token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
        assert out.outputs[0].token_ids == ref, f"prompt of {len(p)} tokens"
    assert bool(fused_calls) == (backend == "triton")
    ids = prompts[-1] + prompts[1]
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0]
    rel = (prefill_logits(llm, ids) - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-4, rel


def test_multimodal_checkpoint_layout(tiny_llama4_dir, tmp_path):
    """A Llama4ForConditionalGeneration checkpoint: text weights under `language_model.`, a vision tower that is
    skipped, the text config nested in `text_config`."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in tiny_llama4_dir.glob("*.safetensors"):
        tensors.update(load_file(f))
    wrapped = {f"language_model.{k}": v for k, v in tensors.items()}
    wrapped["vision_model.patch_embedding.weight"] = torch.zeros(4, 4)
    save_file(wrapped, tmp_path / "model.safetensors")
    text = json.loads((tiny_llama4_dir / "config.json").read_text())
    text.pop("architectures", None)
    cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
           "vision_config": {"hidden_size": 16}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = LLM(str(tiny_llama4_dir), num_kv_blocks=32, max_num_tokens=64)
    b = LLM(str(tmp_path), num_kv_blocks=32, max_num_tokens=64)
    ids = list(range(5, 40))
    torch.testing.assert_close(prefill_logits(a, ids), prefill_logits(b, ids))


@pytest.mark.parametrize("name,num_moe,qk_norm,experts", [("llama-4-scout", 48, True, 16),
                                                         ("llama-4-maverick", 24, False, 128)])
def test_dummy_presets(name, num_moe, qk_norm, experts):
    """The presets resolve to Llama4ForCausalLM at the real shapes (the weights themselves need a GPU)."""
    from llamaserve.config import EngineArgs
    from llamaserve.models.llama4 import moe_layers, rope_layers
    from llamaserve.models.registry import get_model_class

    cfg = EngineArgs(model=name, load_format="dummy", device="cpu", max_seq_len=8192).create_engine_config()
    h = cfg.model_config.hf_config
    assert get_model_class(h).__name__ == "Llama4ForCausalLM"
    assert (h.hidden_size, h.num_hidden_layers, h.num_local_experts, h.vocab_size) == (5120, 48, experts, 202048)
    assert len(moe_layers(h)) == num_moe and sum(rope_layers(h)) == 36 and bool(h.use_qk_norm) == qk_norm


def test_dummy_fp8_llama4_experts(tiny_llama4_dir):
    """--quantization fp8 with dummy weights quantizes the fused experts too, with static activation scales
    calibrated at start like the linears'; the model stays close to the same weights dequantized into a float
    model."""
    from llamaserve.layers.quantization import FP8

    kw = dict(load_format="dummy", num_kv_blocks=32, max_num_tokens=64)
    fp8 = LLM(str(tiny_llama4_dir), quantization="fp8", **kw)
    ref = LLM(str(tiny_llama4_dir), **kw)
    experts = fp8.engine.runner.model.model.layers[1].feed_forward.experts
    assert experts.fp8 and experts.gate_up_proj.dtype == FP8
    assert experts.gate_up_proj_input_scale > 0 and experts.down_proj_input_scale > 0 and experts._calib is None
    qm, rm = fp8.engine.runner.model, ref.engine.runner.model
    with torch.no_grad():
        for (_, q), (_, r) in zip(qm.named_modules(), rm.named_modules()):
            if hasattr(q, "weight_scale"):
                r.weight.copy_(q.weight.float() * q.weight_scale)
            elif getattr(q, "fp8", False):
                r.gate_up_proj.copy_(q.gate_up_proj.float() * q.gate_up_proj_weight_scale)
                r.down_proj.copy_(q.down_proj.float() * q.down_proj_weight_scale)
            elif isinstance(getattr(q, "weight", None), torch.nn.Parameter):
                r.weight.copy_(q.weight)
    ids = torch.randint(3, 512, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = prefill_logits(ref, ids), prefill_logits(fp8, ids)
    assert ((a - b).norm() / a.norm()).item() < 0.1
