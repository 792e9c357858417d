"""Linear layers that know their tensor-parallel shard, and the quantization methods they hold.

Column-parallel layers split the output features over `tp_size` ranks, row-parallel layers split the input
features and all-reduce the result. Fused layers (QKV, gate-up) load each checkpoint part into its own slice
through `weight_loader(param, loaded_weight, shard_id)`. The math lives in a `LinearMethod`, so models never
branch on dtype: `UnquantizedLinearMethod` now; FP8 and NVFP4 methods join it later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _tp() -> tuple[int, int]:
    """(tp_rank, tp_size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LinearMethod:
    def create_weights(self, layer: LinearBase, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: LinearBase, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class LinearBase(nn.Module):
    """A linear layer holding its shard of `weight` [out_per_rank, in_per_rank] and optional `bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 method: LinearMethod | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = _tp()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, dtype)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy(param.data, loaded)

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

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        _, tp_size = _tp()
        if out_features % tp_size:
            raise ValueError(f"output size {out_features} is not divisible by tp_size={tp_size}")
        super().__init__(in_features, out_features // tp_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        _copy(param.data, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored side by side (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, sum(output_sizes), bias, dtype)
        self.output_sizes = [s // self.tp_size for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        offset, size = sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj fused; each rank holds its query heads and its KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype) -> None:
        _, tp_size = _tp()
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)  # KV heads replicate when tp_size > num_kv_heads
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, dtype)

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

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        _, tp_size = _tp()
        if in_features % tp_size:
            raise ValueError(f"input size {in_features} is not divisible by tp_size={tp_size}")
        super().__init__(in_features // tp_size, out_features, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias is added once, after the reduction
            _copy(param.data, loaded)
            return
        size = param.shape[1]
        _copy(param.data, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.method.apply(self, x)
        y = F.linear(x, self.weight)
        torch.distributed.all_reduce(y)
        return y + self.bias if self.bias is not None else y
