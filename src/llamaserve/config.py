"""Engine configuration: `EngineArgs` (what a user sets) and the validated parts it resolves into.

`EngineArgs` is the one flat dataclass that CLI flags and YAML files map onto. `create_engine_config()` resolves
the model (checkpoint directory, GGUF file, dummy preset, or the bundled default), the device and dtypes, and
returns an `EngineConfig` of small dataclasses (model, cache, scheduler, parallel). Every check raises
`ConfigError` naming the option and the fix; nothing is silently adjusted.

Decisions (where the issue is silent):
- `dtype: auto` is float32 on CPU (fast and exact there) and bfloat16 on CUDA.
- `max_seq_len: None` means the model's `max_position_embeddings`; a larger value is an error.
- On CPU the KV cache takes `kv_cache_free_gpu_memory_fraction` of available RAM, capped at `cpu_kv_cache_gib`
  (4 GiB, like vLLM's CPU backend), unless `num_kv_blocks` pins the block count.
- `quantization: fp8` (vLLM's flag): with `load_format: dummy`, random FP8 weights with per-tensor scales and
  static input scales calibrated on a random batch at start (the layout of a ModelOpt FP8 checkpoint); with a
  bf16/fp16/GGUF checkpoint, weights are quantized per tensor at load and activations use dynamic per-tensor scales
  (vLLM's online FP8). ModelOpt checkpoints (their own scales) come with the ModelOpt loader.
- `quantization: nvfp4`: weights in NVIDIA's NVFP4 (e2m1 + e4m3 block scales of 16 + a global scale), activations
  in bf16/fp16 (weight-only: Hopper has no FP4 tensor cores): random NVFP4 weights under `load_format: dummy`,
  a bf16/fp16 checkpoint quantized at load; a ModelOpt NVFP4 checkpoint is recognised by itself.
- KV memory on CUDA: `kv_cache_free_gpu_memory_fraction` (TensorRT-LLM, default 0.9) is the share of the memory
  free after weights and the activation peak; `gpu_memory_utilization` (vLLM) instead caps all of llamaserve's
  GPU memory at that share of the total, and the KV cache gets what is left. Setting both is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and how to fix it."""


LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "fp8", "fp8_e4m3")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DEVICES = ("auto", "cuda", "cpu")
KERNEL_BACKENDS = ("auto", "torch", "triton")
QUANTIZATIONS = (None, "none", "fp8", "nvfp4", "modelopt")


def _kernel_backend(choice: str, device: torch.device) -> str:
    """auto: Triton kernels on CUDA (when triton imports), the torch reference elsewhere."""
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        if choice == "triton":
            raise ConfigError("kernel_backend='triton' needs the triton package (pip install triton)") from None
        return "torch"
    return "triton"


def _choice(name: str, value: Any, choices: tuple | dict) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}.")


@dataclass
class ModelConfig:
    """The resolved model: where weights come from, the HF config, dtype and context length."""

    model: str
    tokenizer: str | None
    load_format: str  # resolved: safetensors | gguf | dummy
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_seq_len: int
    seed: int
    gguf_file: str | None = None
    quant_config: Any = None  # layers.quantization.QuantConfig, or None for unquantized weights


@dataclass
class CacheConfig:
    """KV cache layout: block size, storage dtype and how much memory it may take."""

    block_size: int
    kv_cache_dtype: torch.dtype
    kv_cache_free_gpu_memory_fraction: float
    enable_prefix_caching: bool
    num_kv_blocks: int | None = None
    cpu_kv_cache_gib: float = 4.0
    gpu_memory_utilization: float | None = None


@dataclass
class SchedulerConfig:
    """Per-step limits of the scheduler."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    enable_chunked_prefill: bool


@dataclass
class ParallelConfig:
    tp_size: int = 1
    tp_rank: int = 0


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device: torch.device
    kernel_backend: str
    cuda_graph_sizes: list[int] = dataclasses.field(default_factory=list)  # empty: no CUDA graphs
    cuda_graph_padding: bool = True
    overlap_scheduling: bool = False
    warmup: bool = False


@dataclass
class EngineArgs:
    """Everything a user can set on the engine. Field names follow TensorRT-LLM/vLLM vocabulary."""

    model: str | None = None  # path, .gguf file, dummy preset name, or None for the bundled SmolLM2
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    quantization: str | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    kv_cache_free_gpu_memory_fraction: float | None = None  # None: 0.9 (unless gpu_memory_utilization is set)
    gpu_memory_utilization: float | None = None  # vLLM meaning: share of total GPU memory for everything
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    cpu_kv_cache_gib: float = 4.0
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    device: str = "auto"
    seed: int = 0
    tp_size: int = 1
    ep_size: int = 1
    kernel_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_batch_sizes: list[int] | str | None = None  # None: 1, 2, 4, 8, 16, ... up to the max below
    cuda_graph_max_batch_size: int | None = None  # None: max_batch_size
    cuda_graph_padding: bool = True  # pad a decode batch up to the next captured size
    overlap_scheduling: bool | None = None  # None: on with CUDA (vLLM async_scheduling, TRT-LLM's default)
    disable_overlap_scheduler: bool = False  # TensorRT-LLM's spelling of overlap_scheduling=False
    warmup: bool | None = None  # dummy requests at start-up (EngineCore.warm_up); None: on with CUDA

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def _validate_scalars(self) -> None:
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization={self.quantization!r} is not supported; use 'fp8' (W8A8 per-tensor), "
                              "'nvfp4' (NVFP4 weights, bf16 activations) or leave it unset.")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size} must be at least 1.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ConfigError(f"block_size={self.block_size} must be a power of two between 1 and 256 (e.g. 16).")
        if self.max_num_tokens < self.block_size:
            raise ConfigError(f"max_num_tokens={self.max_num_tokens} is smaller than block_size={self.block_size}; "
                              f"set max_num_tokens to at least {self.block_size} (e.g. 8192).")
        frac = self.kv_cache_free_gpu_memory_fraction
        if frac is not None and not 0.0 < frac <= 1.0:
            raise ConfigError(f"kv_cache_free_gpu_memory_fraction={frac} must be "
                              "in (0, 1]; e.g. 0.9 gives the KV cache 90% of the memory left after the weights.")
        util = self.gpu_memory_utilization
        if util is not None and not 0.0 < util <= 1.0:
            raise ConfigError(f"gpu_memory_utilization={util} must be in (0, 1]; e.g. 0.9 lets llamaserve use 90% "
                              "of the GPU's memory in all.")
        if frac is not None and util is not None:
            raise ConfigError("set kv_cache_free_gpu_memory_fraction (TensorRT-LLM: share of the memory left after "
                              "weights) or gpu_memory_utilization (vLLM: share of all GPU memory), not both.")
        if self.ep_size != 1:
            raise ConfigError(f"ep_size={self.ep_size}: expert parallelism is not implemented yet; use ep_size=1.")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks} must be at least 1, or unset to size the cache "
                              "from kv_cache_free_gpu_memory_fraction.")
        if self.tp_size != 1:
            raise ConfigError(f"tp_size={self.tp_size}: tensor parallelism is not implemented yet; use tp_size=1.")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len={self.max_seq_len} must be at least 2 (one prompt + one output token).")

    def _resolve_device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'.")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def create_engine_config(self) -> EngineConfig:
        from llamaserve.loader.source import resolve_model_source

        self._validate_scalars()
        device = self._resolve_device()
        source = resolve_model_source(self.model, self.load_format)
        hf_config = source.hf_config
        model_max = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
        max_seq_len = self.max_seq_len or model_max
        if model_max and max_seq_len > model_max:
            raise ConfigError(f"max_seq_len={max_seq_len} is larger than the model's max_position_embeddings="
                              f"{model_max}; set max_seq_len to {model_max} or less.")
        if not self.enable_chunked_prefill and self.max_num_tokens < max_seq_len:
            raise ConfigError(f"max_num_tokens={self.max_num_tokens} < max_seq_len={max_seq_len} with chunked prefill "
                              "off: a long prompt could never be scheduled. Enable chunked prefill or raise "
                              "max_num_tokens to max_seq_len.")
        dtype = DTYPES[self.dtype]
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        quant_config = self._quant_config(source, dtype, device)
        kv_auto_fp8 = self.kv_cache_dtype == "auto" and quant_config is not None and quant_config.kv_cache_fp8
        if self.kv_cache_dtype in ("fp8", "fp8_e4m3") or kv_auto_fp8:  # auto: what the checkpoint was made for
            kv_dtype = torch.float8_e4m3fn
        elif self.kv_cache_dtype in ("bf16", "bfloat16"):
            kv_dtype = torch.bfloat16
        else:
            kv_dtype = dtype
        model_config = ModelConfig(
            model=source.path, tokenizer=self.tokenizer or source.tokenizer, load_format=source.load_format,
            hf_config=hf_config, dtype=dtype, max_seq_len=max_seq_len, seed=self.seed,
            gguf_file=source.gguf_file, quant_config=quant_config)
        cache_config = CacheConfig(
            block_size=self.block_size, kv_cache_dtype=kv_dtype,
            kv_cache_free_gpu_memory_fraction=0.9 if self.kv_cache_free_gpu_memory_fraction is None
            else self.kv_cache_free_gpu_memory_fraction, gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching, num_kv_blocks=self.num_kv_blocks,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib)
        scheduler_config = SchedulerConfig(
            max_batch_size=self.max_batch_size, max_num_tokens=self.max_num_tokens, max_seq_len=max_seq_len,
            enable_chunked_prefill=self.enable_chunked_prefill)
        backend = _kernel_backend(self.kernel_backend, device)
        if self.overlap_scheduling and self.disable_overlap_scheduler:
            raise ConfigError("overlap_scheduling=true contradicts disable_overlap_scheduler=true; set one of them.")
        overlap = self.overlap_scheduling
        if overlap is None:
            overlap = device.type == "cuda" and not self.disable_overlap_scheduler
        return EngineConfig(model_config, cache_config, scheduler_config, ParallelConfig(self.tp_size, 0),
                            device, backend, self._cuda_graph_sizes(device, backend), self.cuda_graph_padding,
                            overlap, device.type == "cuda" if self.warmup is None else self.warmup)

    def _quant_config(self, source: Any, dtype: torch.dtype, device: torch.device) -> Any:
        """A ModelOpt checkpoint's own scheme, else `quantization` (fp8: calibrated dummy or online; nvfp4: random
        NVFP4 dummy weights or online)."""
        import json
        from pathlib import Path

        from llamaserve.layers.quantization import QuantConfig, modelopt_config

        ckpt = None
        if source.load_format == "safetensors":
            raw = json.loads((Path(source.path) / "config.json").read_text())
            try:
                ckpt = modelopt_config(source.path, raw)
            except ValueError as e:
                raise ConfigError(f"model={self.model!r}: {e}") from None
        if ckpt is not None:
            if self.quantization in ("fp8", "nvfp4") and self.quantization != ckpt.method:
                raise ConfigError(f"quantization={self.quantization!r} but {self.model!r} is a ModelOpt "
                                  f"{ckpt.method} checkpoint; leave quantization unset (or 'modelopt').")
            return ckpt
        if self.quantization == "modelopt":
            raise ConfigError(f"quantization='modelopt' but {self.model!r} is not a ModelOpt checkpoint (no "
                              "hf_quant_config.json); use quantization='fp8' or 'nvfp4' to quantize it at load.")
        if self.quantization not in ("fp8", "nvfp4"):
            return None
        if self.quantization == "fp8" and dtype == torch.float32 and device.type == "cuda":
            raise ConfigError("quantization='fp8' computes in bf16/fp16 on CUDA; set dtype to bfloat16 or auto.")
        dummy = source.load_format == "dummy"
        if self.quantization == "nvfp4":  # weight-only: no input scales to calibrate
            return QuantConfig("nvfp4", static_input_scales=False, online=not dummy, dummy=dummy)
        return QuantConfig("fp8", static_input_scales=dummy, online=not dummy, dummy=dummy)

    def _cuda_graph_sizes(self, device: torch.device, backend: str) -> list[int]:
        """Decode batch sizes to capture: none on CPU, with enforce_eager, or with the torch reference kernels."""
        sizes = self.cuda_graph_batch_sizes
        if isinstance(sizes, str):
            try:
                sizes = [int(x) for x in sizes.replace(" ", "").split(",") if x]
            except ValueError:
                raise ConfigError(f"cuda_graph_batch_sizes={self.cuda_graph_batch_sizes!r}: give integers, e.g. "
                                  "1,2,4,8") from None
        if sizes is not None and (not sizes or any(not isinstance(x, int) or x < 1 for x in sizes)):
            raise ConfigError(f"cuda_graph_batch_sizes={sizes!r}: give positive integers, e.g. [1, 2, 4, 8]")
        cap = self.cuda_graph_max_batch_size
        if cap is not None and cap < 1:
            raise ConfigError(f"cuda_graph_max_batch_size={cap} must be at least 1")
        if self.enforce_eager or device.type != "cuda" or backend != "triton":
            return []
        from llamaserve.executor.cuda_graphs import default_sizes

        cap = min(cap or self.max_batch_size, self.max_batch_size)
        sizes = [x for x in (sizes or default_sizes(cap)) if x <= self.max_batch_size]
        return sorted(set(sizes))
