"""Quantization methods a linear layer holds: FP8 W8A8 with per-tensor scales (ModelOpt / TensorRT-LLM layout), and
the QuantConfig that picks them (NVFP4 weight-only, `Nvfp4LinearMethod`, lives in layers/nvfp4.py).

`Fp8LinearMethod` stores `weight` [out, in] as float8_e4m3fn (value = weight * weight_scale), one float32
`weight_scale` per checkpoint shard while loading, and `input_scale` (static activation scale) when the checkpoint
has one. After loading, `finalize()` folds the shard scales of a fused layer (QKV, gate-up) into one shared scale
(the largest; the other shards are re-quantized to it) and does the same for the input scales, so the fused layer
is one `torch._scaled_mm`. Activations: static scale when there is one (x / input_scale, saturated to +-448),
dynamic per-tensor otherwise (amax / 448, computed on the device: no host sync, CUDA-graph safe). A caller may pass
an input already quantized with `static_input_scale` (the fused RMSNorm / SiLU kernels do), which skips the step.

`torch._scaled_mm` runs on CUDA (FP8 tensor cores); on the CPU the same product runs as a float32 matmul of the
FP8 values, scaled after (torch 2.13's CPU `_scaled_mm` took 25 ms per row of a 576 x 1536 GEMM on a 2-core Xeon,
a float32 matmul 0.3 ms, equal to 1e-5). `reference_fp8_linear` is the spec both are tested against (dequantize
both operands, matmul in float32).

One-row calls on CUDA (batch-1 decode) of a layer marked `one_token_gemv` (Llama 4's linears, where it measured
0.06 ms per Scout step faster) take kernels/gemv.py's FP8 GEMV instead of cuBLAS. LLAMASERVE_FP8_SMALL_M picks
otherwise: `cublas` (every call on cuBLAS), `gemv` (every FP8 linear's one-row calls on the GEMV: for measuring
other models; on Llama-3.1-8B it cost 0.03-0.04 ms per batch-1 step, so Llama 3 does not mark its layers),
`triton` (calls of at most 16 rows on the older tensor-core kernel kernels/fp8_gemv.py, which lost to cuBLAS on
the 8B: 3.19 against 3.54 TB/s, step 4.01 against 3.29 ms); LLAMASERVE_FP8_GEMV=BLOCK_NxBLOCK_KxWARPS sets the
GEMV's launch, LLAMASERVE_FP8_GEMV_HALF=0 its float32 products instead of float16 (kernels/gemv.py).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from llamaserve.layers.nvfp4 import Nvfp4LinearMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SMALL_M_MODES = ("auto", "cublas", "gemv", "triton")


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to the e4m3 range, as float8_e4m3fn."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dynamic_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale amax / 448 as a float32 device tensor (never zero)."""
    return (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12).reshape(())


def reference_fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    y = (xq.float() * x_scale) @ (w.float() * w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class QuantConfig:
    """What the checkpoint (or --quantization) asks for. `method`: "fp8" (W8A8 per-tensor) or "nvfp4" (weights in
    NVFP4, activations in bf16/fp16; layers/nvfp4.py)."""

    method: str = "fp8"
    static_input_scales: bool = True  # ModelOpt checkpoints carry input_scale; dummy FP8 weights are calibrated
    online: bool = False  # the checkpoint holds bf16/fp16 weights: quantize them while loading
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # names or fnmatch patterns
    kv_cache_fp8: bool = False  # the checkpoint carries k_scale / v_scale for an FP8 KV cache
    dummy: bool = False  # random weights: linear input scales are calibrated at start, the experts' are dynamic

    def excluded(self, prefix: str) -> bool:
        """Whether the module at `prefix` (our fused names, or the checkpoint's) stays unquantized."""
        names = {prefix, prefix.removeprefix("language_model.")}
        for fused, parts in _FUSED_PARTS.items():
            if prefix.endswith(fused):
                names |= {prefix[: -len(fused)] + p for p in parts}
        for pat in self.exclude_modules:
            for name in names:
                if fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(name, f"*.{pat}") or fnmatch.fnmatch(
                        f"language_model.{name}", pat) or name.split(".")[-1] == pat:
                    return True
        return False

    def linear_method(self, prefix: str = "") -> Fp8LinearMethod | Nvfp4LinearMethod | None:
        if self.excluded(prefix):
            return None
        if self.method == "nvfp4":
            from llamaserve.layers.nvfp4 import Nvfp4LinearMethod

            return Nvfp4LinearMethod(self.static_input_scales, prefix)
        return Fp8LinearMethod(self.static_input_scales)


def modelopt_config(model_dir: str | Path, hf_config_dict: dict[str, Any]) -> QuantConfig | None:
    """The QuantConfig of a ModelOpt checkpoint (`hf_quant_config.json`, or `quantization_config` with
    quant_method "modelopt" in config.json), None for an unquantized one. Raises ValueError for schemes llamaserve
    cannot run. quant_algo FP8 -> method "fp8"; NVFP4 (group_size 16) -> "nvfp4" (W4A16_NVFP4, the weight-only
    export without input scales, too)."""
    qc = None
    path = Path(model_dir) / "hf_quant_config.json"
    if path.is_file():
        qc = json.loads(path.read_text()).get("quantization", {})
    else:
        cfg = hf_config_dict.get("quantization_config") or {}
        if cfg.get("quant_method") == "modelopt":
            qc = cfg
        elif cfg:
            raise ValueError(f"quantization_config.quant_method={cfg.get('quant_method')!r} is not supported; "
                             "llamaserve loads ModelOpt FP8 and NVFP4 checkpoints (or quantizes bf16 ones: "
                             "--quantization fp8 or nvfp4)")
    if qc is None:
        return None
    algo = str(qc.get("quant_algo", "")).upper()
    if algo not in ("FP8", "NVFP4", "W4A16_NVFP4"):
        raise ValueError(f"ModelOpt quant_algo={algo!r} is not supported; llamaserve runs FP8 and NVFP4 checkpoints "
                         "(re-export with --qformat fp8 or nvfp4, or `llamaserve quantize --qformat ...` a bf16 one)")
    exclude = list(qc.get("exclude_modules") or qc.get("ignore") or []) or ["lm_head"]
    kv = str(qc.get("kv_cache_quant_algo") or "").upper() == "FP8"
    if algo == "FP8":
        return QuantConfig("fp8", static_input_scales=True, online=False, exclude_modules=exclude, kv_cache_fp8=kv)
    group = int(qc.get("group_size") or 16)
    if group != 16:
        raise ValueError(f"ModelOpt NVFP4 group_size={group} is not supported; NVFP4 has one e4m3 scale per 16 "
                         "weights (re-export the checkpoint with group_size 16)")
    return QuantConfig("nvfp4", static_input_scales=algo == "NVFP4", online=False, exclude_modules=exclude,
                       kv_cache_fp8=kv)


def small_m_mode() -> str:
    """LLAMASERVE_FP8_SMALL_M (default `auto`), checked: which kernel a few-row FP8 call takes (module docstring)."""
    mode = os.environ.get("LLAMASERVE_FP8_SMALL_M", "auto")
    if mode not in SMALL_M_MODES:
        raise ValueError(f"LLAMASERVE_FP8_SMALL_M={mode!r}: expected one of {', '.join(SMALL_M_MODES)}")
    return mode


class Fp8LinearMethod:
    """W8A8 FP8 per-tensor. See the module docstring for the layout."""

    def __init__(self, static_input_scale: bool = True) -> None:
        self.static = static_input_scale

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype,
                       num_shards: int = 1) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.ones(num_shards, dtype=torch.float32), requires_grad=False)
        layer.input_scale = (nn.Parameter(torch.ones(num_shards, dtype=torch.float32), requires_grad=False)
                             if self.static else None)
        layer.out_dtype = dtype

    def finalize(self, layer: nn.Module, shard_slices: list[tuple[int, int]]) -> None:
        """One weight scale (and one input scale) for the whole fused weight."""
        ws = layer.weight_scale.data
        if ws.numel() > 1:
            shared = ws.max()
            for (offset, size), s in zip(shard_slices, ws):
                if s != shared:
                    part = layer.weight.data.narrow(0, offset, size)
                    part.copy_(quantize_fp8(part.float() * s, shared))
            layer.weight_scale = nn.Parameter(shared.reshape(()), requires_grad=False)
        else:
            layer.weight_scale = nn.Parameter(ws.reshape(()), requires_grad=False)
        if layer.input_scale is not None:
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(()), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == FP8:  # quantized upstream with layer.input_scale
            xq, sx = x, layer.input_scale
        elif layer.input_scale is not None:
            sx = layer.input_scale
            xq = quantize_fp8(x, sx)
        else:
            sx = dynamic_scale(x)
            xq = quantize_fp8(x, sx)
        shape = xq.shape
        xq = xq.reshape(-1, shape[-1])
        mode = small_m_mode() if xq.is_cuda and xq.shape[0] <= 16 else "cublas"
        if xq.shape[0] == 1 and layer.bias is None and (
                mode == "gemv" or (mode == "auto" and getattr(layer, "one_token_gemv", False))):
            from llamaserve.kernels import gemv, launch_from_env
            from llamaserve.kernels.pdl import gemv_trigger

            launch = launch_from_env("LLAMASERVE_FP8_GEMV", gemv.FP8_LAUNCH, gemv.LAUNCH_FIELDS)
            y = gemv.gemv(xq, layer.weight, *launch, x_scale=sx, w_scale=layer.weight_scale,
                          out_dtype=layer.out_dtype, half=os.environ.get("LLAMASERVE_FP8_GEMV_HALF", "1") != "0",
                          trigger=gemv_trigger(xq.device))
            return y.reshape(*shape[:-1], y.shape[-1])
        if mode == "triton":
            from llamaserve.kernels.fp8_gemv import fp8_gemv

            y = fp8_gemv(xq, sx, layer.weight, layer.weight_scale, layer.bias, layer.out_dtype)
            return y.reshape(*shape[:-1], y.shape[-1])
        if not xq.is_cuda:  # _scaled_mm's arithmetic (float32 sums, then both scales) as a float32 matmul
            y = (xq.float() @ layer.weight.float().t()) * (sx * layer.weight_scale)
            y = (y + layer.bias.float() if layer.bias is not None else y).to(layer.out_dtype)
        else:
            y = torch._scaled_mm(xq, layer.weight.t(), scale_a=sx, scale_b=layer.weight_scale, bias=layer.bias,
                                 out_dtype=layer.out_dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


@torch.no_grad()
def calibrate_input_scales(model: nn.Module, run: Callable[[], None]) -> int:
    """Static input scales from one calibration batch: each FP8 layer's input amax / 448 (ModelOpt's max
    calibration). `run` pushes the batch through the model; the layers use dynamic scales meanwhile.
    Returns how many layers were calibrated."""
    layers = [m for m in model.modules()
              if isinstance(getattr(m, "method", None), Fp8LinearMethod) and m.input_scale is not None]
    amax = {id(m): torch.zeros((), device=m.weight.device) for m in layers}
    hooks = []
    for m in layers:
        m.input_scale = None

        def hook(module: nn.Module, args: tuple) -> None:
            acc = amax[id(module)]
            acc.copy_(torch.maximum(acc, args[0].abs().amax().float()))

        hooks.append(m.register_forward_pre_hook(hook))
    # other modules with static input scales (the fused MoE experts) calibrate themselves
    others = [m for m in model.modules() if hasattr(m, "begin_calibration") and m.begin_calibration()]
    try:
        run()
    finally:
        for m in others:
            m.end_calibration()
        for h in hooks:
            h.remove()
        for m in layers:
            scale = (amax[id(m)] / FP8_MAX).clamp(min=1e-6)
            m.input_scale = nn.Parameter(scale, requires_grad=False)
    return len(layers) + len(others)
