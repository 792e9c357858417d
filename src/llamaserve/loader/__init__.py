"""Weight loading: build the model for a resolved `ModelConfig` and fill its parameters.

Formats: `safetensors` (a HF directory, sharded or not; the index is honoured when present), `gguf`
(dequantized through transformers, see gguf_loader.py) and `dummy` (random weights at the real shapes, seeded,
norms at 1; a matrix with `fan_in` input features is uniform in +-1/sqrt(fan_in), so activations keep their size
through the depth of the model, as in a trained one, rather than growing layer by layer). With an FP8
`QuantConfig`, dummy FP8 weights are drawn the same way and quantized per tensor (scale = bound / 448); their
static input scales are calibrated later by the model runner (`calibrate_input_scales`), once a KV cache exists
to run a batch through. With an NVFP4 `QuantConfig`, the packed weights are drawn the same way (fan-in = twice
the packed width) and quantized as ModelOpt would (global scale bound / (6 * 448)); NVFP4 is weight-only, so
there is nothing to calibrate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llamaserve.config import ModelConfig
from llamaserve.layers.linear import LinearBase
from llamaserve.layers.nvfp4 import init_dummy_nvfp4
from llamaserve.layers.quantization import FP8, quantize_fp8
from llamaserve.models.registry import get_model_class


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    for fname in files:
        with safe_open(str(model_dir / fname), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_scale", "_scale_2")):  # set with their weights, or calibrated (input_scale)
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            # fan-in: [out, in] matrices, [experts, in, out] fused expert weights
            bound = p.shape[-1] ** -0.5 if p.dim() == 2 else p.shape[1] ** -0.5 if p.dim() == 3 else 0.05
            owner, pname = name.rpartition(".")[::2]
            scale = "weight_scale" if pname == "weight" else f"{pname}_weight_scale"  # fused experts' names
            if p.dtype == FP8:
                _init_fp8(getattr(model.get_submodule(owner), scale), p, bound, generators[p.device],
                          rows=4096 if p.dim() == 2 else 1)  # experts one at a time
                continue
            if p.dtype == torch.uint8:  # NVFP4, packed along the inputs: [out, in / 2], experts [E, out, in / 2]
                module = model.get_submodule(owner)
                init_dummy_nvfp4(p, getattr(module, scale), getattr(module, f"{scale}_2"),
                                 (2 * p.shape[-1]) ** -0.5, generators[p.device])
                continue
            p.uniform_(-bound, bound, generator=generators[p.device])


def _init_fp8(scale_param: torch.Tensor, p: torch.Tensor, bound: float, gen: torch.Generator,
              rows: int = 4096) -> None:
    """uniform(-bound, bound) quantized with one per-tensor scale, in row chunks to bound the float32 copy."""
    scale = torch.tensor(bound / torch.finfo(FP8).max, device=p.device)
    for start in range(0, p.shape[0], rows):
        part = p[start : start + rows]
        drawn = torch.empty(part.shape, device=p.device).uniform_(-bound, bound, generator=gen)
        part.copy_(quantize_fp8(drawn, scale))
    scale_param.fill_(scale.item())


def finalize_layers(model: nn.Module) -> None:
    """Per-layer post-load step: fused FP8 layers get one shared weight (and input) scale, NVFP4 layers one global
    scale per row."""
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.finalize()


def get_model(model_config: ModelConfig, device: torch.device, backend: str = "torch") -> nn.Module:
    cfg = model_config.hf_config
    cls = get_model_class(cfg)
    quant = model_config.quant_config
    with torch.device(device):
        model = cls(cfg, model_config.max_seq_len, model_config.dtype, backend, quant)
    if model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
        finalize_layers(model)
        return model.eval()
    if model_config.load_format == "gguf":
        from llamaserve.loader.gguf_loader import iter_gguf_weights

        weights = iter_gguf_weights(model_config.gguf_file, cfg)
    else:
        weights = iter_safetensors(model_config.model)
    loaded = model.load_weights(weights)
    expected = {n for n, _ in model.named_parameters()}
    if quant is not None and quant.online:  # scales come from quantizing at load, not from the checkpoint
        expected = {n for n in expected if not n.endswith(("_scale", "_scale_2"))}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_config.model} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    finalize_layers(model)
    return model.eval()
