"""NVFP4 weights (NVIDIA ModelOpt layout), run weight-only: packing, quantizing and the linear method.

Format (ModelOpt `quant_algo: NVFP4`, `group_size: 16`; the layout vLLM's ModelOptNvFp4Config and TensorRT-LLM
read). Per linear layer with weight W [out, in]:
- `weight` uint8 [out, in / 2]: two e2m1 codes per byte, the LOW nibble is element 2j, the high nibble 2j + 1.
  An e2m1 code is sign (bit 3) and magnitude index (bits 0-2) into 0, 0.5, 1, 1.5, 2, 3, 4, 6.
- `weight_scale` float8_e4m3fn [out, in / 16]: one scale per block of 16 consecutive inputs of a row.
- `weight_scale_2` float32 scalar: the global scale, amax(W) / (6 * 448).
- `input_scale` float32 scalar: amax(input) / (6 * 448), for W4A4 (NVFP4 activations).
W[n, k] = e2m1(code[n, k]) * float(weight_scale[n, k // 16]) * weight_scale_2. ModelOpt quantizes with block
scale = (amax(block) / 6) / weight_scale_2 cast to e4m3 (1.0 for an all-zero block) and code = the nearest e2m1
value of w / (float(block scale) * weight_scale_2), ties to the even code (ModelOpt's `NVFP4QTensor._cast_fp4`).

Weight-only on Hopper: activations stay bf16/fp16 and the weight is dequantized in registers inside the GEMM
(kernels/nvfp4_gemm.py; Hopper has no FP4 tensor cores). `input_scale` is read and kept on the layer, unused,
for a later Blackwell W4A4 path. On the CPU (and without CUDA) `apply` runs the torch reference: dequantize,
then F.linear.

Fused layers (QKV, gate-up): every checkpoint shard has its own `weight_scale_2`. While loading, they sit in a
[num_shards] vector (`_scale_loader`, like the FP8 scales); `finalize()` spreads them over the rows, so
`weight_scale_2` becomes a float32 [out] per-row global scale and every shard stays exact (no re-quantization;
the GEMM multiplies its fp32 accumulator by the row's scale in the epilogue). The input scales keep their maximum.
A bf16/fp16 checkpoint is quantized at load (online), one global scale per checkpoint tensor, as ModelOpt would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
BLOCK = 16  # inputs per block scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# magnitudes at or above bound i round to code i + 1; a tie (equal to a bound) goes to the even code
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [16]: the value of every e2m1 code (codes 8-15 are the negatives of 0-7)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (values 0-15, K even) -> uint8 [..., K / 2], element 2j in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2] -> uint8 codes [..., K] (low nibble first)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float -> the uint8 code of the nearest e2m1 value (ties to the even code, saturating at +-6)."""
    mag = x.abs().float()
    bounds = torch.tensor(_BOUNDS, device=x.device)
    code = torch.searchsorted(bounds, mag.contiguous())  # number of bounds below mag: a tie rounds down
    tie_up = (mag.unsqueeze(-1) == bounds[1::2]).any(-1)  # ties at the odd bounds round up to the even code
    return ((code + tie_up).to(torch.uint8)) | ((x < 0).to(torch.uint8) << 3)


def global_scale_of(w: torch.Tensor) -> torch.Tensor:
    """ModelOpt's weight_scale_2: amax(w) / (6 * 448), a float32 scalar (never zero)."""
    return (w.abs().amax().float() / (FP4_MAX * FP8_MAX)).clamp(min=1e-12).reshape(())


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 16) -> (packed uint8 [..., K / 2], block scales float8_e4m3fn [..., K / 16],
    global scale float32 scalar), as ModelOpt quantizes. `global_scale` defaults to amax(w) / (6 * 448)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the input size to be a multiple of {BLOCK}, got {w.shape[-1]}")
    g = global_scale_of(w) if global_scale is None else global_scale.float().reshape(())
    blocks = w.float().reshape(*w.shape[:-1], -1, BLOCK)  # [..., K / 16, 16]
    block_amax = blocks.abs().amax(-1)
    scale = (block_amax / FP4_MAX / g).clamp(max=FP8_MAX)
    scale = torch.where(block_amax == 0, torch.ones_like(scale), scale).to(FP8)
    codes = round_to_e2m1(blocks / (scale.float().unsqueeze(-1) * g))
    return pack_e2m1(codes.reshape(w.shape)), scale, g


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [..., N, K / 2], block_scale [..., N, K / 16], global_scale scalar or per row [..., N] ->
    [..., N, K] in `dtype`: e2m1 * block scale (exact in float32) * global scale, rounded once."""
    vals = e2m1_table(packed.device)[unpack_e2m1(packed).long()]
    w = vals * block_scale.float().repeat_interleave(BLOCK, dim=-1)
    g = global_scale.float()
    return (w * (g.unsqueeze(-1) if g.dim() else g)).to(dtype)


def nvfp4_linear_torch(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                       global_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference the Triton GEMM is tested against: x [..., K] @ dequantized W [N, K]^T (+ bias), x's dtype."""
    return F.linear(x, dequantize_nvfp4(packed, block_scale, global_scale, x.dtype), bias)


@torch.no_grad()
def init_dummy_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, bound: float,
                     gen: torch.Generator, rows: int = 4096) -> None:
    """Random NVFP4 weights: uniform(-bound, bound) quantized with the global scale bound / (6 * 448) (what
    ModelOpt would pick for that draw), in chunks of `rows` rows to bound the float32 copy. `global_scale`, of
    any shape, is filled."""
    g = torch.tensor(bound / (FP4_MAX * FP8_MAX), device=packed.device)
    flat_p, flat_s = packed.view(-1, packed.shape[-1]), block_scale.view(-1, block_scale.shape[-1])
    for start in range(0, flat_p.shape[0], rows):
        part = flat_p[start : start + rows]
        drawn = torch.empty(part.shape[0], part.shape[1] * 2, device=packed.device).uniform_(
            -bound, bound, generator=gen)
        q, s, _ = quantize_nvfp4(drawn, g)
        part.copy_(q)
        flat_s[start : start + rows].copy_(s)
    global_scale.fill_(g.item())


class Nvfp4LinearMethod:
    """NVFP4 weights, bf16/fp16 activations (weight-only). See the module docstring for the layout."""

    def __init__(self, static_input_scale: bool = True, prefix: str = "") -> None:
        self.static = static_input_scale
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype,
                       num_shards: int = 1) -> None:
        if in_features % BLOCK:
            raise ValueError(f"{self.prefix or 'a linear layer'}: NVFP4 needs the input size to be a multiple of "
                             f"{BLOCK}, got {in_features}; list the layer in exclude_modules to keep it unquantized")

        def param(*shape: int, dtype: torch.dtype, fill: float = 0.0) -> nn.Parameter:
            return nn.Parameter(torch.full(shape, fill, dtype=torch.float32).to(dtype), requires_grad=False)

        layer.weight = param(out_features, in_features // 2, dtype=torch.uint8)
        layer.weight_scale = param(out_features, in_features // BLOCK, dtype=FP8, fill=1.0)
        layer.weight_scale_2 = param(num_shards, dtype=torch.float32, fill=1.0)  # per shard until finalize()
        layer.input_scale = param(num_shards, dtype=torch.float32, fill=1.0) if self.static else None
        layer.out_dtype = dtype

    def quantize_on_load(self, layer: nn.Module, loaded: torch.Tensor, shard_id: object) -> torch.Tensor:
        """A bf16/fp16/fp32 checkpoint tensor (online quantization): its block scales and global scale go into
        the shard's slots; returns the packed weight, for the layer's own weight loader."""
        packed, block_scale, g = quantize_nvfp4(loaded)
        layer.weight_loader(layer.weight_scale, block_scale, shard_id)
        layer.weight_scale_2.data[layer.shard_ids.index(shard_id)] = g
        return packed

    def finalize(self, layer: nn.Module, shard_slices: list[tuple[int, int]]) -> None:
        """Per-shard global scales -> one per output row; the input scales keep their maximum."""
        g = layer.weight_scale_2.data
        if g.numel() == len(shard_slices):  # per shard (also when every shard is one row: then this is a no-op)
            rows = torch.cat([g[i].expand(size) for i, (_, size) in enumerate(shard_slices)])
            layer.weight_scale_2 = nn.Parameter(rows.contiguous(), requires_grad=False)
        if layer.input_scale is not None:
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(()), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda:
            from llamaserve.kernels.nvfp4_gemm import nvfp4_gemm

            y = nvfp4_gemm(x2, layer.weight, layer.weight_scale, layer.weight_scale_2, layer.bias)
        else:
            y = nvfp4_linear_torch(x2, layer.weight, layer.weight_scale, layer.weight_scale_2, layer.bias)
        return y.reshape(*shape[:-1], y.shape[-1]).to(layer.out_dtype)
