"""`llamaserve quantize --qformat nvfp4` writes ModelOpt NVFP4 checkpoints; llamaserve loads them, and what it
computes is exactly the float model whose weights are the dequantized NVFP4 weights (same greedy tokens, logits
within 1e-4 in float32). Also: the per-expert checkpoint layout, online NVFP4 and random NVFP4 weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamaserve import LLM, SamplingParams
from llamaserve.config import ConfigError
from llamaserve.entrypoints.cli import main
from llamaserve.layers.moe_nvfp4 import Nvfp4FusedExperts
from llamaserve.layers.nvfp4 import FP8, dequantize_nvfp4
from llamaserve.loader.quantize import quantize_checkpoint
from tests.conftest import LONG_TEXT
from tests.models.test_llama_parity import prefill_logits

_SCALES = (".weight_scale", ".weight_scale_2", ".input_scale", "_weight_scale", "_weight_scale_2", "_input_scale")


def dequantize_checkpoint(src: Path, out: Path) -> Path:
    """The float32 checkpoint of an NVFP4 one: every packed weight dequantized (fused experts back to their
    [E, in, out] orientation), its scales dropped; KV-cache scales and everything else kept; no quantization
    config."""
    ck = load_file(src / "model.safetensors")
    tensors = {}
    for name, t in ck.items():
        if name.endswith(_SCALES):
            continue
        if t.dtype == torch.uint8 and name.endswith(".weight"):
            stem = name[: -len(".weight")]
            t = dequantize_nvfp4(t, ck[f"{stem}.weight_scale"], ck[f"{stem}.weight_scale_2"])
        elif t.dtype == torch.uint8:  # fused experts [E, in / 2, out]
            t = dequantize_nvfp4(t.transpose(1, 2), ck[f"{name}_weight_scale"].transpose(1, 2),
                                 ck[f"{name}_weight_scale_2"]).transpose(1, 2)
        tensors[name] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def _check_modelopt_names(ck: dict[str, torch.Tensor], stem: str, out_features: int, in_features: int) -> None:
    assert ck[f"{stem}.weight"].dtype == torch.uint8 and ck[f"{stem}.weight"].shape == (out_features, in_features // 2)
    assert ck[f"{stem}.weight_scale"].dtype == FP8 and ck[f"{stem}.weight_scale"].shape == (out_features,
                                                                                             in_features // 16)
    for scalar in ("weight_scale_2", "input_scale"):
        assert ck[f"{stem}.{scalar}"].dtype == torch.float32 and ck[f"{stem}.{scalar}"].shape == ()
    assert 0 < ck[f"{stem}.input_scale"].item() < 1


def _assert_same_model(nvfp4: LLM, ref: LLM, prompts: list[list[int]], ids: list[int], max_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    got, want = nvfp4.generate(prompts, params), ref.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    a, b = prefill_logits(nvfp4, ids), prefill_logits(ref, ids)
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_smollm2_nvfp4_is_its_dequantized_model(smollm2_dir, tmp_path):
    out = quantize_checkpoint(smollm2_dir, tmp_path / "smol-nvfp4", calib_tokens=128, qformat="nvfp4")
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["group_size"] == 16 and hq["kv_cache_quant_algo"] == "FP8"
    assert "lm_head" in hq["exclude_modules"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "NVFP4"
    ck = load_file(out / "model.safetensors")
    base = "model.layers.0"
    for proj, (n, k) in {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
                         "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576),
                         "mlp.down_proj": (576, 1536)}.items():
        _check_modelopt_names(ck, f"{base}.{proj}", n, k)
    assert ck[f"{base}.self_attn.k_proj.k_scale"].shape == () and ck["model.embed_tokens.weight"].dtype != torch.uint8

    q = LLM(str(out), num_kv_blocks=24, max_num_tokens=256)
    assert q.config.cache_config.kv_cache_dtype == torch.float8_e4m3fn
    qkv = q.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.uint8 and qkv.weight_scale_2.shape == (960,) and qkv.static_input_scale is None
    ref = LLM(str(dequantize_checkpoint(out, tmp_path / "smol-deq")), num_kv_blocks=24, max_num_tokens=256,
              kv_cache_dtype="fp8")  # the same FP8 KV cache, with the checkpoint's k/v scales
    ids = q.tokenizer.encode(LONG_TEXT)
    _assert_same_model(q, ref, [q.tokenizer.encode("The capital of France is")], ids, 6)


@pytest.fixture(scope="module")
def llama4_nvfp4(tmp_path_factory, small_llama4_config) -> tuple[Path, Path]:
    """A tiny random Llama 4 (bf16 source) and its NVFP4 checkpoint written by the CLI."""
    from transformers import Llama4ForCausalLM

    cfg = small_llama4_config
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("l4nvfp4")
    Llama4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path / "src")
    assert main(["quantize", str(path / "src"), "-o", str(path / "nvfp4"), "--calib-tokens", "64",
                 "--qformat", "nvfp4"]) == 0
    return path / "src", path / "nvfp4"


_PROMPTS = [[5, 6, 7], list(range(3, 40))]
_IDS = torch.randint(3, 256, (60,), generator=torch.Generator().manual_seed(2)).tolist()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama4_nvfp4_is_its_dequantized_model(llama4_nvfp4, tmp_path, backend):
    _, out = llama4_nvfp4
    ck = load_file(out / "model.safetensors")
    moe = "model.layers.1.feed_forward"
    _check_modelopt_names(ck, f"{moe}.shared_expert.down_proj", 64, 32)
    _check_modelopt_names(ck, "model.layers.0.self_attn.q_proj", 64, 64)
    want = {"gate_up_proj": ((4, 32, 64), (4, 4, 64)), "down_proj": ((4, 16, 64), (4, 2, 64))}  # [E, in/., out]
    for name, (packed_shape, scale_shape) in want.items():
        stem = f"{moe}.experts.{name}"
        assert ck[stem].dtype == torch.uint8 and ck[stem].shape == packed_shape
        assert ck[f"{stem}_weight_scale"].dtype == FP8 and ck[f"{stem}_weight_scale"].shape == scale_shape
        assert ck[f"{stem}_weight_scale_2"].shape == () and ck[f"{stem}_input_scale"].shape == ()
    assert ck[f"{moe}.router.weight"].dtype == torch.bfloat16

    q = LLM(str(out), num_kv_blocks=32, max_num_tokens=128, kernel_backend=backend)
    experts = q.engine.runner.model.model.layers[1].feed_forward.experts
    assert isinstance(experts, Nvfp4FusedExperts) and experts.gate_up_proj.shape == (4, 64, 32)
    assert 0 < experts.gate_up_proj_input_scale.min().item() < 1
    ref = LLM(str(dequantize_checkpoint(out, tmp_path / "deq")), num_kv_blocks=32, max_num_tokens=128,
              kernel_backend=backend, kv_cache_dtype="fp8")
    _assert_same_model(q, ref, _PROMPTS, _IDS, 8)


def _per_expert(src: Path, out: Path) -> Path:
    """Rewrite fused NVFP4 experts as per-expert tensors (`experts.{e}.gate_proj.weight` [out, in / 2], ...)."""
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)(.*)$", name)
        if m is None:
            tensors[name] = t
            continue
        stem, proj, suffix = m.groups()
        parts = ["gate_proj", "up_proj"] if proj == "gate_up_proj" else ["down_proj"]
        kind = {"": "weight"}.get(suffix, suffix[1:])
        for e in range(4):
            for i, part in enumerate(parts):
                piece = t if t.dim() == 0 else t[e].t().chunk(len(parts))[i]  # [out, in / b]
                tensors[f"{stem}.{e}.{part}.{kind}"] = piece.contiguous().clone()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "hf_quant_config.json"):
        shutil.copy(src / f, out / f)
    return out


def test_per_expert_layout_and_online_nvfp4_load_the_same_weights(llama4_nvfp4, tmp_path):
    src, out = llama4_nvfp4
    fused = LLM(str(out), num_kv_blocks=32, max_num_tokens=128)
    per_expert = LLM(str(_per_expert(out, tmp_path / "per-expert")), num_kv_blocks=32, max_num_tokens=128)
    online = LLM(str(src), quantization="nvfp4", num_kv_blocks=32, max_num_tokens=128)
    assert online.config.model_config.quant_config.online
    params = dict(fused.engine.runner.model.named_parameters())
    for other in (per_expert, online):
        for name, p in other.engine.runner.model.named_parameters():
            if name.endswith("_input_scale") or name.endswith(".input_scale"):
                continue  # online NVFP4 is weight-only: no input scales
            assert torch.equal(p.float(), params[name].float()), name
    a, b = prefill_logits(fused, _IDS), prefill_logits(per_expert, _IDS)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="ModelOpt nvfp4 checkpoint"):
        LLM(str(out), quantization="fp8", num_kv_blocks=32)


def test_dummy_nvfp4_weights(llama4_nvfp4):
    src, _ = llama4_nvfp4
    llm = LLM(str(src), load_format="dummy", quantization="nvfp4", num_kv_blocks=32, max_num_tokens=128)
    model = llm.engine.runner.model
    down = model.model.layers[0].feed_forward.down_proj  # [64, 64]
    assert down.weight.dtype == torch.uint8 and down.input_scale is None
    w = dequantize_nvfp4(down.weight, down.weight_scale, down.weight_scale_2)
    bound = 64**-0.5  # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the FP8 dummy weights
    assert w.abs().max().item() <= bound * 1.001 and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)
    experts = model.model.layers[1].feed_forward.experts
    gu = dequantize_nvfp4(experts.gate_up_proj, experts.gate_up_proj_weight_scale,
                          experts.gate_up_proj_weight_scale_2)
    assert gu.shape == (4, 64, 64) and gu.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
