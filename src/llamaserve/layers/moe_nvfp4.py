"""Llama 4 routed experts with NVFP4 weights (ModelOpt), run weight-only: `Nvfp4FusedExperts`.

Same constructor and `forward(x, top_ids, top_scores)` as layers/moe.py's `FusedExperts`; Llama4MoE picks this
class when the QuantConfig's method is "nvfp4" and the experts are not excluded. Stored as the GEMM reads them,
in linear-layer orientation (rows = outputs, e2m1 codes packed along the inputs, layers/nvfp4.py):
`gate_up_proj` uint8 [E, 2I, H / 2] (gate = the first I rows), `gate_up_proj_weight_scale` float8_e4m3fn
[E, 2I, H / 16], `gate_up_proj_weight_scale_2` float32 [E, 2I] (global scale per row), `gate_up_proj_input_scale`
float32 [E] (kept for W4A4, unused); the same four for `down_proj` ([E, H, I / 2], [E, H, I / 16], [E, H], [E]).

Checkpoint layouts accepted (models/llama.py `load_packed_weights` routes the names):
- Fused, as ModelOpt exports Llama 4 today and nvidia/Llama-4-Scout-17B-16E-Instruct-NVFP4 ships it (ModelOpt's
  `maybe_transpose_expert_weight_dimensions` quantizes the bmm-style weight [E, in, out] transposed and writes it
  back in the bmm orientation; the layout sglang PR #35032 reads from that checkpoint): `experts.gate_up_proj`
  uint8 [E, H / 2, 2I], `experts.gate_up_proj_weight_scale` e4m3 [E, H / 16, 2I], `..._weight_scale_2` and
  `..._input_scale` float32 scalars (one per fused tensor), same for `experts.down_proj` ([E, I / 2, H] ...).
  `llamaserve quantize --qformat nvfp4` writes this layout too. The loader transposes the last two dims.
- Per expert, as vLLM's Llama 4 loader also accepts (`experts.{e}.gate_proj|up_proj|down_proj.weight`, `.weight_scale`
  [out, in / 2] / [out, in / 16], `.weight_scale_2`, `.input_scale` scalars): copied into expert e's rows; gate and
  up keep their own global scales (per-row storage), the gate/up input scales keep their maximum.
- bf16/fp16 experts (`experts.gate_up_proj` [E, H, 2I], online quantization): one global scale per tensor.
`nvfp4_experts_torch` is the reference (a loop over the experts that got tokens, host sync); backend "triton"
runs kernels/nvfp4_gemm.py's grouped GEMM.
"""

from __future__ import annotations

import torch
from torch import nn

from llamaserve.layers.nvfp4 import BLOCK, FP8, dequantize_nvfp4, quantize_nvfp4
from llamaserve.layers.quantization import QuantConfig


def nvfp4_experts_torch(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                        gate_up_scale_2: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                        down_scale_2: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor) -> torch.Tensor:
    """The float computation of layers/moe.py's `fused_experts_torch` on the dequantized experts (dequantized one
    expert at a time, in the [in, out] orientation it multiplies): x [T, H], packed weights as in the module
    docstring, top_ids / top_scores [T, k] -> [T, H] in x's dtype."""
    from llamaserve.layers.moe import experts_loop  # moe.py imports this module

    def weights_of(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_nvfp4(gate_up[e], gate_up_scale[e], gate_up_scale_2[e], x.dtype).t().contiguous(),
                dequantize_nvfp4(down[e], down_scale[e], down_scale_2[e], x.dtype).t().contiguous())

    return experts_loop(x, top_ids, top_scores, weights_of)


class Nvfp4FusedExperts(nn.Module):
    """NVFP4 routed experts; see the module docstring for the parameters and the checkpoint layouts."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, backend: str = "torch",
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if hidden % BLOCK or inter % BLOCK:
            raise ValueError(f"{prefix}: NVFP4 experts need hidden_size ({hidden}) and intermediate_size ({inter}) "
                             f"to be multiples of {BLOCK}; list the experts in exclude_modules to keep them bf16")
        self.backend, self.num_experts, self.inter = backend, num_experts, inter
        static = quant is not None and quant.static_input_scales and not quant.online and not quant.dummy
        for name, (n, k) in {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}.items():
            params = {"": (torch.uint8, (num_experts, n, k // 2), 0.0),
                      "_weight_scale": (FP8, (num_experts, n, k // BLOCK), 1.0),
                      "_weight_scale_2": (torch.float32, (num_experts, n), 1.0)}
            if static:
                params["_input_scale"] = (torch.float32, (num_experts,), 0.0)
            for suffix, (pdtype, shape, fill) in params.items():
                p = nn.Parameter(torch.full(shape, fill).to(pdtype), requires_grad=False)
                p.weight_loader = self._make_loader(name, suffix)
                setattr(self, name + suffix, p)
            if not static:
                setattr(self, f"{name}_input_scale", None)

    def _rows(self, name: str, sid: object) -> slice:
        """The rows of one checkpoint part: gate (shard 0) / up (shard 1) of gate_up_proj, or all of down_proj."""
        if name == "gate_up_proj" and sid is not None:
            return slice(int(sid) * self.inter, (int(sid) + 1) * self.inter)
        return slice(None)

    def _make_loader(self, name: str, suffix: str):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            """shard_id None: a fused checkpoint tensor over all experts; (expert, part): one expert's tensor."""
            if shard_id is None:
                self._load_fused(name, suffix, param, loaded)
                return
            e, sid = shard_id
            rows = self._rows(name, sid)
            if suffix == "":
                if loaded.is_floating_point():  # a bf16 per-expert checkpoint: quantize this part at load
                    loaded, scale, g = quantize_nvfp4(loaded)
                    getattr(self, f"{name}_weight_scale").data[e, rows] = scale
                    getattr(self, f"{name}_weight_scale_2").data[e, rows] = g
                param.data[e, rows] = loaded
            elif suffix == "_weight_scale":
                param.data[e, rows] = loaded
            elif suffix == "_weight_scale_2":
                param.data[e, rows] = loaded.float().reshape(())
            else:  # input scale: gate and up see the same input; keep the larger
                param.data[e] = torch.maximum(param.data[e], loaded.float().reshape(()))
        return load

    def _load_fused(self, name: str, suffix: str, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if suffix in ("_weight_scale_2", "_input_scale"):  # one scalar (or one per expert) for the whole tensor
            v = loaded.float()
            param.data.copy_(v.reshape(-1, *[1] * (param.dim() - 1)).expand_as(param) if v.numel() > 1 else
                             v.reshape(()).expand_as(param))
            return
        if suffix == "" and loaded.is_floating_point():  # bf16 [E, in, out]: quantize at load
            loaded, scale, g = quantize_nvfp4(loaded.transpose(1, 2))
            getattr(self, f"{name}_weight_scale").data.copy_(scale)
            getattr(self, f"{name}_weight_scale_2").data.fill_(g.item())
            param.data.copy_(loaded)
            return
        want = (param.shape[0], param.shape[2], param.shape[1])  # ModelOpt's bmm orientation [E, in / b, out]
        if tuple(loaded.shape) != want:
            raise ValueError(f"experts.{name}{suffix}: checkpoint shape {tuple(loaded.shape)}, expected {want} "
                             "(ModelOpt's fused NVFP4 expert layout [experts, in / block, out])")
        param.data.copy_(loaded.transpose(1, 2))

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                shared: torch.Tensor | None = None) -> torch.Tensor:
        """sum over k of expert_{top_ids}(x * top_scores), plus `shared` when given."""
        weights = (self.gate_up_proj, self.gate_up_proj_weight_scale, self.gate_up_proj_weight_scale_2,
                   self.down_proj, self.down_proj_weight_scale, self.down_proj_weight_scale_2)
        if self.backend == "triton":
            from llamaserve.kernels.nvfp4_gemm import nvfp4_fused_moe

            out = nvfp4_fused_moe(x, *weights, top_ids, top_scores)
        else:
            out = nvfp4_experts_torch(x, *weights, top_ids, top_scores)
        return out if shared is None else shared + out

    def forward_logits(self, x: torch.Tensor, logits: torch.Tensor, top_k: int,
                       shared: torch.Tensor | None = None) -> torch.Tensor:
        """Route (layers/moe.py `route_topk`) and run the experts, as `FusedExperts.forward_logits`."""
        from llamaserve.layers.moe import route_topk  # moe.py imports this module

        return self(x, *route_topk(logits, top_k, x.dtype), shared=shared)
