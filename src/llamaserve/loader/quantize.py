"""`llamaserve quantize`: write a ModelOpt-layout FP8 or NVFP4 checkpoint from a bf16/fp16/fp32 one.

The source model runs once over `calib_tokens` random token ids (the engine's own model, with hooks) to record,
per linear layer, the absolute maximum of its input, and per attention layer that of its keys and values
(ModelOpt's max calibration). Every q/k/v/o/gate/up/down projection is then written as float8_e4m3fn with
`weight_scale` = amax(W) / 448 and `input_scale` = amax(input) / 448 under its checkpoint name; the KV-cache
scales go to `...self_attn.k_proj.k_scale` / `v_proj.v_scale`; the fused Llama 4 experts become FP8 with one scale
per tensor (`experts.gate_up_proj_weight_scale`, `..._input_scale` from the amax of the score-scaled tokens and
of the SiLU-and-mul output); embeddings, norms, lm_head and the MoE router keep their precision and are listed in
`exclude_modules`.
`hf_quant_config.json` and config.json's `quantization_config` (quant_method "modelopt") describe the result, so
TensorRT-LLM, vLLM and llamaserve read it alike. One safetensors file is written (fine for the models tests use).

`qformat="nvfp4"` (ModelOpt's `--qformat nvfp4`, `quant_algo: NVFP4`, `group_size: 16`): the same projections become
`weight` uint8 [out, in / 2] + `weight_scale` e4m3 [out, in / 16] + `weight_scale_2` (amax(W) / (6 * 448)) +
`input_scale` (amax(input) / (6 * 448)), layers/nvfp4.py; the fused experts are quantized in the orientation they
multiply (rows = outputs) and written back in ModelOpt's bmm orientation: `experts.gate_up_proj` uint8
[E, H / 2, 2I], `..._weight_scale` [E, H / 16, 2I], scalar `..._weight_scale_2` / `..._input_scale` (as ModelOpt
exports Llama 4, layers/moe_nvfp4.py). Exclusions and KV-cache scales as for FP8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llamaserve.layers.attention import Attention
from llamaserve.layers.linear import LinearBase
from llamaserve.layers.moe import FusedExperts
from llamaserve.layers.nvfp4 import FP4_MAX, quantize_nvfp4
from llamaserve.layers.quantization import FP8_MAX, quantize_fp8

_PARTS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_EXCLUDE = ["lm_head", "*.router", "vision_model*", "multi_modal_projector*"]
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "tokenizer.model", "chat_template.jinja", "chat_template.json")


@torch.no_grad()
def calibrate(llm, num_tokens: int, seed: int = 0) -> tuple[dict[str, float], dict[int, tuple[float, float]]]:
    """(input amax per linear module name, (k amax, v amax) per attention layer) over random token ids."""
    runner = llm.engine.runner
    model = runner.model
    inputs: dict[str, float] = {}
    kv: dict[int, tuple[float, float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            def on_linear(mod, args, name=name):
                inputs[name] = max(inputs.get(name, 0.0), float(args[0].abs().amax()))
            hooks.append(module.register_forward_pre_hook(on_linear))
        if isinstance(module, FusedExperts):
            def on_experts(mod, args, name=name):
                x, ids, scores = args
                rows = x.repeat_interleave(ids.shape[1], dim=0) * scores.reshape(-1, 1).to(x.dtype)
                inter = mod.down_proj.shape[1]
                act_amax = 0.0
                for e in ids.reshape(-1).unique().tolist():
                    gu = rows[ids.reshape(-1) == e] @ mod.gate_up_proj[e].to(rows.dtype)
                    act = gu[:, inter:] * torch.nn.functional.silu(gu[:, :inter])
                    act_amax = max(act_amax, float(act.abs().amax()))
                prev = inputs.get(f"{name}.gate_up_proj", 0.0), inputs.get(f"{name}.down_proj", 0.0)
                inputs[f"{name}.gate_up_proj"] = max(prev[0], float(rows.abs().amax()))
                inputs[f"{name}.down_proj"] = max(prev[1], act_amax)
            hooks.append(module.register_forward_pre_hook(on_experts))
    for i, attn in enumerate(model.attention_layers()):
        assert isinstance(attn, Attention)

        def on_attn(mod, args, i=i):
            k_prev, v_prev = kv.get(i, (0.0, 0.0))
            kv[i] = (max(k_prev, float(args[1].abs().amax())), max(v_prev, float(args[2].abs().amax())))
        hooks.append(attn.register_forward_pre_hook(on_attn))
    n = min(num_tokens, llm.config.scheduler_config.max_num_tokens, llm.config.model_config.max_seq_len)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    try:
        runner._dummy_run(n, ids.to(runner.device))
    finally:
        for h in hooks:
            h.remove()
    return inputs, kv


def _module_of(ckpt_name: str) -> tuple[str, str] | None:
    """'model.layers.3.self_attn.q_proj.weight' -> ('model.layers.3.self_attn.qkv_proj', 'q_proj')."""
    if not ckpt_name.endswith(".weight"):
        return None
    base = ckpt_name[: -len(".weight")].removeprefix("language_model.")
    parent, _, part = base.rpartition(".")
    if part not in _PARTS:
        return None
    return f"{parent}.{_PARTS[part]}", part


def _fp8(t: torch.Tensor, input_amax: float) -> dict[str, torch.Tensor]:
    """'' (the weight), '_weight_scale', '_input_scale' of one FP8 tensor."""
    w_scale = (t.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    return {"": quantize_fp8(t, w_scale).contiguous(), "_weight_scale": w_scale.reshape(()),
            "_input_scale": torch.tensor(max(input_amax, 1e-6) / FP8_MAX)}


def _nvfp4(t: torch.Tensor, input_amax: float, bmm: bool = False) -> dict[str, torch.Tensor]:
    """The same for NVFP4, plus '_weight_scale_2'; `bmm`: fused experts [E, in, out], quantized along `in`."""
    packed, block_scale, g = quantize_nvfp4(t.transpose(1, 2) if bmm else t)
    if bmm:
        packed, block_scale = packed.transpose(1, 2), block_scale.transpose(1, 2)
    return {"": packed.contiguous(), "_weight_scale": block_scale.contiguous(), "_weight_scale_2": g,
            "_input_scale": torch.tensor(max(input_amax, 1e-6) / (FP4_MAX * FP8_MAX))}


def quantize_checkpoint(src: str | Path, out: str | Path, calib_tokens: int = 512, kv_fp8: bool = True,
                        qformat: str = "fp8") -> Path:
    from safetensors.torch import save_file

    from llamaserve.entrypoints.llm import LLM
    from llamaserve.loader import iter_safetensors

    if qformat not in ("fp8", "nvfp4"):
        raise ValueError(f"qformat={qformat!r} is not supported; use 'fp8' or 'nvfp4'")
    src, out = Path(src), Path(out)
    # the torch reference kernels: their attention runs through Attention.forward, where the KV hooks sit
    llm = LLM(str(src), enforce_eager=True, num_kv_blocks=-(-calib_tokens // 16) + 4, max_num_tokens=calib_tokens,
              kernel_backend="torch")
    amax, kv = calibrate(llm, calib_tokens)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in iter_safetensors(src):
        base = name.removeprefix("language_model.")
        if base.endswith((".experts.gate_up_proj", ".experts.down_proj")) and base in amax:
            parts = _nvfp4(t, amax[base], bmm=True) if qformat == "nvfp4" else _fp8(t, amax[base])
            tensors.update({f"{name}{suffix}": v for suffix, v in parts.items()})  # ModelOpt's fused-expert names
            continue
        found = _module_of(name)
        if found is None or found[0] not in amax:
            tensors[name] = t.contiguous()
            continue
        stem = name[: -len(".weight")]
        parts = _nvfp4(t, amax[found[0]]) if qformat == "nvfp4" else _fp8(t, amax[found[0]])
        tensors.update({f"{stem}.{suffix[1:] or 'weight'}": v for suffix, v in parts.items()})
    prefix = "language_model." if any(k.startswith("language_model.") for k in tensors) else ""
    if kv_fp8:
        for i, (k_amax, v_amax) in kv.items():
            base = f"{prefix}model.layers.{i}.self_attn"
            tensors[f"{base}.k_proj.k_scale"] = torch.tensor(max(k_amax, 1e-6) / FP8_MAX)
            tensors[f"{base}.v_proj.v_scale"] = torch.tensor(max(v_amax, 1e-6) / FP8_MAX)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_algo": qformat.upper(), "kv_cache_quant_algo": "FP8" if kv_fp8 else None,
             **({"group_size": 16} if qformat == "nvfp4" else {}), "exclude_modules": _EXCLUDE}
    (out / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "llamaserve-quantize"}, "quantization": quant}, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", **quant}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in _COPY:
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out
