"""Linear layers that know their tensor-parallel shard, and the quantization methods they hold.

Column-parallel layers split the output features over `tp_size` ranks, row-parallel layers split the input
features and all-reduce the result. Fused layers (QKV, gate-up) load each checkpoint part into its own slice
through `weight_loader(param, loaded_weight, shard_id)`. The math lives in a `LinearMethod`, so models never
branch on dtype: `UnquantizedLinearMethod`, or `Fp8LinearMethod` (layers/quantization.py) / `Nvfp4LinearMethod`
(layers/nvfp4.py) when a `QuantConfig` is given. Per-shard scalar scales (`weight_scale`, `weight_scale_2`,
`input_scale`) load into their shard's entry; 2-D scales (NVFP4 block scales [out, in / 16]) are laid out like the
weight and load through the same sharded loader. The loader calls `finalize()` on every layer once all tensors are
in, which gives a fused FP8 layer one shared scale and a fused NVFP4 layer one global scale per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.layers.quantization import FP8, Fp8LinearMethod, QuantConfig, dynamic_scale, quantize_fp8


def _tp() -> tuple[int, int]:
    """(tp_rank, tp_size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LinearMethod:
    def create_weights(self, layer: LinearBase, in_features: int, out_features: int, dtype: torch.dtype,
                       num_shards: int = 1) -> None:
        raise NotImplementedError

    def finalize(self, layer: LinearBase, shard_slices: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: LinearBase, in_features: int, out_features: int, dtype: torch.dtype,
                       num_shards: int = 1) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def finalize(self, layer: LinearBase, shard_slices: list[tuple[int, int]]) -> None:
        pass

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class LinearBase(nn.Module):
    """A linear layer holding its shard of `weight` [out_per_rank, in_per_rank] and optional `bias`."""

    shard_ids: tuple = (None,)  # checkpoint parts a fused layer is made of, in storage order

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.tp_rank, self.tp_size = _tp()
        self.in_features, self.out_features = in_features, out_features
        self.method = (quant.linear_method(prefix) if quant is not None else None) or UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, dtype, len(self.shard_ids))
        self.weight.weight_loader = self._load_weight
        for name in ("weight_scale", "weight_scale_2", "input_scale"):
            scale = getattr(self, name, None)
            if scale is not None:  # block scales (2-D) shard like the weight; the rest hold one value per shard
                scale.weight_loader = self.weight_loader if scale.dim() == 2 else self._scale_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    @property
    def static_input_scale(self) -> torch.Tensor | None:
        """The FP8 input scale when this layer takes a statically quantized input, else None (NVFP4 layers keep
        their input scale for a later W4A4 path, but take bf16/fp16 inputs)."""
        return getattr(self, "input_scale", None) if isinstance(self.method, Fp8LinearMethod) else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy(param.data, loaded)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """A higher-precision tensor into an FP8 weight (online quantization) gets its own per-tensor scale; into
        an NVFP4 (packed uint8) weight, its own block and global scales."""
        if param.dtype == FP8 and loaded.dtype != FP8:
            scale = dynamic_scale(loaded)
            loaded = quantize_fp8(loaded, scale)
            self.weight_scale.data[self.shard_ids.index(shard_id)] = scale
        elif param.dtype == torch.uint8 and loaded.is_floating_point():
            loaded = self.method.quantize_on_load(self, loaded, shard_id)
        self.weight_loader(param, loaded, shard_id)

    def _scale_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data[self.shard_ids.index(shard_id)] = loaded.reshape(()).float()

    def shard_slices(self) -> list[tuple[int, int]]:
        """(row offset, rows) of each shard in `weight`."""
        return [(0, self.weight.shape[0])]

    def finalize(self) -> None:
        self.method.finalize(self, self.shard_slices())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}")
    dst.copy_(src)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W split by rows (output features) across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        _, tp_size = _tp()
        if out_features % tp_size:
            raise ValueError(f"output size {out_features} is not divisible by tp_size={tp_size}")
        super().__init__(in_features, out_features // tp_size, bias, dtype, quant, prefix)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        _copy(param.data, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored side by side (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant, prefix)
        self.output_sizes = [s // self.tp_size for s in output_sizes]

    def shard_slices(self) -> list[tuple[int, int]]:
        return [(sum(self.output_sizes[:i]), size) for i, size in enumerate(self.output_sizes)]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        offset, size = sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj fused; each rank holds its query heads and its KV heads."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, quant: QuantConfig | None = None, prefix: str = "") -> None:
        _, tp_size = _tp()
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)  # KV heads replicate when tp_size > num_kv_heads
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, dtype, quant, prefix)

    def shard_slices(self) -> list[tuple[int, int]]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [(0, q), (q, kv), (q + kv, kv)]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        rank = self._shard_rank(shard_id, loaded.shape[0], size)
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))

    def _shard_rank(self, shard_id: object, total: int, size: int) -> int:
        if shard_id == "q":
            return self.tp_rank
        num_shards = total // size  # fewer KV shards than ranks: consecutive ranks share one
        return self.tp_rank * num_shards // self.tp_size


class RowParallelLinear(LinearBase):
    """y = x W^T with W split by columns (input features); partial results are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        _, tp_size = _tp()
        if in_features % tp_size:
            raise ValueError(f"input size {in_features} is not divisible by tp_size={tp_size}")
        super().__init__(in_features // tp_size, out_features, bias, dtype, quant, prefix)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias is added once, after the reduction
            _copy(param.data, loaded)
            return
        size = param.shape[1]
        _copy(param.data, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.method.apply(self, x)
        bias, self.bias = self.bias, None  # the bias is added once, after the reduction
        try:
            y = self.method.apply(self, x)
        finally:
            self.bias = bias
        torch.distributed.all_reduce(y)
        return y + self.bias if self.bias is not None else y
