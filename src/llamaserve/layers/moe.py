"""Mixture-of-experts feed-forward of Llama 4: a top-k sigmoid router, fused routed experts and a shared expert.

Router: logits = x W_r^T over the experts; each token takes its top-k experts (Llama 4: k = 1) with score
sigmoid(logit), and the expert sees the token already multiplied by its score (as transformers' Llama4TextMoe
does). Experts are stored fused, as the checkpoints store them: `gate_up_proj` [E, H, 2I] (gate = first I
columns) and `down_proj` [E, I, H]; expert e computes (silu(x G_e) * x U_e) D_e. The shared expert is a plain
SwiGLU MLP added to every token. `fused_experts_torch` is the reference (a loop over the experts that got
tokens, with a host sync); backend "triton" runs the grouped-GEMM kernel kernels/fused_moe.py (no host sync,
CUDA-graph safe).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.layers.linear import ReplicatedLinear
from llamaserve.layers.moe_nvfp4 import Nvfp4FusedExperts
from llamaserve.layers.quantization import FP8, FP8_MAX, QuantConfig, dynamic_scale, quantize_fp8


def fused_experts_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor,
                        top_scores: torch.Tensor) -> torch.Tensor:
    """x [T, H]; gate_up [E, H, 2I]; down [E, I, H]; top_ids / top_scores [T, k] -> sum over k of
    expert_{id}(x * score), [T, H] in x's dtype."""
    return experts_loop(x, top_ids, top_scores, lambda e: (gate_up[e], down[e]))


def experts_loop(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                 weights_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The float reference's loop over the experts that got tokens (host sync); `weights_of(e)` gives expert e's
    (gate_up [H, 2I], down [I, H]) in x's dtype, so quantized experts can dequantize one expert at a time."""
    t, h = x.shape
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    flat_ids = top_ids.reshape(-1)
    rows = torch.arange(t, device=x.device).repeat_interleave(top_ids.shape[1])
    scaled = x[rows] * top_scores.reshape(-1, 1).to(x.dtype)  # [T * k, H]
    for e in flat_ids.unique().tolist():
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        w_gu, w_dn = weights_of(e)
        inter = w_dn.shape[0]
        gu = scaled[sel] @ w_gu  # [n, 2I]
        y = (gu[:, inter:] * F.silu(gu[:, :inter])) @ w_dn
        out.index_add_(0, rows[sel], y.float())
    return out.to(x.dtype)


def fused_experts_fp8_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_ids: torch.Tensor,
                            top_scores: torch.Tensor, gu_scale: torch.Tensor, dn_scale: torch.Tensor,
                            a1: torch.Tensor | None, a2: torch.Tensor | None,
                            act_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the FP8 experts, step for step as kernels/fused_moe.py: the scaled token quantized per tensor
    (a1, or dynamic: amax(x) / 448, which bounds the score-scaled token since scores are at most 1), FP8 weights
    dequantized per expert, the SiLU-and-mul output quantized again (a2, or dynamic) before the down projection."""
    t, h = x.shape
    k = top_ids.shape[1]
    rows = x.repeat_interleave(k, dim=0) * top_scores.reshape(-1, 1).to(x.dtype)
    s1 = a1 if a1 is not None else dynamic_scale(x)
    rows = quantize_fp8(rows, s1).float() * s1
    inter = down.shape[1]
    flat = top_ids.reshape(-1)
    groups = [(e, (flat == e).nonzero(as_tuple=True)[0]) for e in flat.unique().tolist()]
    act = torch.zeros((t * k, inter), dtype=torch.float32, device=x.device)
    for e, sel in groups:
        gu = (rows[sel] @ (gate_up[e].float() * gu_scale[e])).to(x.dtype).float()
        act[sel] = (gu[:, inter:] * F.silu(gu[:, :inter])).to(x.dtype).float()
    if act_amax is not None:  # calibration: the largest activation seen
        act_amax.copy_(torch.maximum(act_amax, act.abs().amax()))
    s2 = a2 if a2 is not None else dynamic_scale(act)
    act = quantize_fp8(act, s2).float() * s2
    out = torch.zeros((t * k, h), dtype=torch.float32, device=x.device)
    for e, sel in groups:
        out[sel] = (act[sel] @ (down[e].float() * dn_scale[e])).to(x.dtype).float()
    return out.view(t, k, h).sum(dim=1).to(x.dtype)


class FusedExperts(nn.Module):
    """The routed experts' weights, fused as Llama 4 checkpoints store them: `gate_up_proj` [E, H, 2I] and
    `down_proj` [E, I, H] (logical shapes; in memory each expert's matrix is stored transposed, [E, 2I, H] and
    [E, H, I], K contiguous, which the FP8 tensor-core GEMM reads faster: 4.3 against 3.8 TB/s on the H200 sweep
    of benchmarks/moe_bench.py; loading copies through the transposed view). FP8 (a QuantConfig that does not
    exclude them): float8_e4m3fn weights with one scale per tensor (`gate_up_proj_weight_scale`,
    `down_proj_weight_scale`, ModelOpt's fused-expert names), static input scales (`..._input_scale`) from the
    checkpoint or, for dummy weights, calibrated at start (`begin_calibration` / `end_calibration`, called by
    `calibrate_input_scales`); dynamic per-tensor for a float checkpoint quantized at load."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, backend: str = "torch",
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.backend, self.num_experts = backend, num_experts
        self.fp8 = quant is not None and not quant.excluded(prefix)
        wdtype = FP8 if self.fp8 else dtype
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=wdtype).transpose(1, 2),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=wdtype).transpose(1, 2),
                                      requires_grad=False)
        self._calib: list[torch.Tensor] | None = None
        self._wscales: tuple | None = None
        if self.fp8:
            static = quant.static_input_scales and not quant.online
            for name in ("gate_up_proj", "down_proj"):
                scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
                scale.weight_loader = self._scalar_loader
                setattr(self, f"{name}_weight_scale", scale)
                inp = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False) if static else None
                if inp is not None:
                    inp.weight_loader = self._scalar_loader
                setattr(self, f"{name}_input_scale", inp)
                getattr(self, name).weight_loader = self._make_weight_loader(name)

    def _scalar_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded.float().reshape(-1).max())  # a per-expert vector collapses to its largest entry
        self._wscales = None

    def _make_weight_loader(self, name: str):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            if loaded.dtype != FP8:  # a float checkpoint: quantize with one scale per tensor
                scale = dynamic_scale(loaded)
                getattr(self, f"{name}_weight_scale").data.copy_(scale)
                self._wscales = None
                loaded = quantize_fp8(loaded, scale)
            param.data.copy_(loaded)
        return load

    def _weight_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-tensor weight scales as [E] vectors, which the kernels index by expert: made once (a copy in
        every forward was two more kernel launches per layer), again after a loader writes a scale or the
        module moves."""
        gs, ds = self.gate_up_proj_weight_scale, self.down_proj_weight_scale
        key = (gs.data_ptr(), ds.data_ptr())
        if self._wscales is None or self._wscales[0] != key:
            e = self.num_experts
            self._wscales = (key, gs.detach().expand(e).contiguous(), ds.detach().expand(e).contiguous())
        return self._wscales[1], self._wscales[2]

    def begin_calibration(self) -> bool:
        """Static input scales from the next forward passes (ModelOpt's max calibration); dynamic meanwhile."""
        if not self.fp8 or self.gate_up_proj_input_scale is None:
            return False
        dev = self.gate_up_proj.device
        self._calib = [torch.zeros((), device=dev), torch.zeros((), device=dev)]
        return True

    def end_calibration(self) -> None:
        if self._calib is None:
            return
        for name, amax in zip(("gate_up_proj", "down_proj"), self._calib):
            getattr(self, f"{name}_input_scale").data.copy_((amax / FP8_MAX).clamp(min=1e-6))
        self._calib = None

    def _scales(self) -> tuple:
        if not self.fp8:
            return ()
        a1, a2 = self.gate_up_proj_input_scale, self.down_proj_input_scale
        if self._calib is not None:
            a1 = a2 = None
        return (*self._weight_scales(), a1, a2)

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                shared: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """sum over k of expert_{top_ids}(x * top_scores), plus `shared` when given (a tensor, or a callable that
        returns it: kernels/fused_moe.py calls it only when it needs the tensor)."""
        scales = self._scales()
        if self._calib is not None:  # record the amax of the score-scaled tokens and of the activation
            rows = x.repeat_interleave(top_ids.shape[1], dim=0) * top_scores.reshape(-1, 1).to(x.dtype)
            self._calib[0].copy_(torch.maximum(self._calib[0], rows.abs().amax().float()))
            out = fused_experts_fp8_torch(x, self.gate_up_proj, self.down_proj, top_ids, top_scores, *scales,
                                          act_amax=self._calib[1])
        elif self.backend == "triton":
            from llamaserve.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, top_ids, top_scores, *scales, shared=shared)
        else:
            reference = fused_experts_fp8_torch if self.fp8 else fused_experts_torch
            out = reference(x, self.gate_up_proj, self.down_proj, top_ids, top_scores, *scales)
        shared = shared() if callable(shared) else shared
        return out if shared is None else shared + out

    def forward_logits(self, x: torch.Tensor, logits: torch.Tensor, top_k: int,
                       shared: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Route (top-k on the router logits, sigmoid of the chosen logit) and run the experts. The Triton backend
        does top-1 routing inside the alignment kernel; otherwise through `forward` (so hooks see ids and scores)."""
        if self.backend == "triton" and top_k == 1 and self._calib is None:
            from llamaserve.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, None, None, *self._scales(), shared=shared,
                             router_logits=logits)
        return self(x, *route_topk(logits, top_k, x.dtype), shared=shared)


def route_topk(logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4's router: (top_ids [T, k], scores [T, k] = sigmoid of the chosen logits, in `dtype`)."""
    top_val, top_ids = logits.topk(top_k, dim=-1)
    return top_ids, torch.sigmoid(top_val.float()).to(dtype)


class Llama4MoE(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, backend: str, quant: QuantConfig | None, prefix: str,
                 mlp_cls: type) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; Llama 4 uses 'silu'")
        self.top_k = int(cfg.num_experts_per_tok)
        self.router = ReplicatedLinear(cfg.hidden_size, cfg.num_local_experts, False, dtype)  # never quantized
        nvfp4 = quant is not None and quant.method == "nvfp4" and not quant.excluded(f"{prefix}.experts")
        experts_cls = Nvfp4FusedExperts if nvfp4 else FusedExperts
        self.experts = experts_cls(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, dtype, backend,
                                   quant, f"{prefix}.experts")
        self.shared_expert = mlp_cls(cfg, dtype, backend, quant, f"{prefix}.shared_expert",
                                     intermediate_size=cfg.intermediate_size)

    def decode_sized(self, x: torch.Tensor) -> bool:
        """Whether a step of x's tokens takes the decode path (Triton backend, top-1, at most DECODE_MAX_PAIRS
        tokens): the router kernel, routing inside kernels/moe_decode.py, the shared expert's own stream."""
        if self.experts.backend != "triton" or self.top_k != 1:
            return False
        from llamaserve.kernels import moe_decode

        return x.shape[0] <= moe_decode.DECODE_MAX_PAIRS

    def forward(self, x: torch.Tensor, shared_input: torch.Tensor | None = None, defer_shared: bool = False,
                logits: torch.Tensor | None = None) -> torch.Tensor | PendingSum:
        """x [T, H]; `shared_input`: x already quantized for the shared expert's FP8 input (the norm writes it);
        `logits`: the router's logits when the norm computed them (kernels/moe_decode.py `norm_router`).

        Decode-sized steps on the GPU (Triton backend, top-1, at most DECODE_MAX_PAIRS tokens) run the shared
        expert on a second stream, concurrently with the routed experts (SGLang does the same for DeepSeek's
        shared experts): at one token each kernel is a short weight stream, and the two chains fill each other's
        launch gaps and tails. The routed down GEMM then adds the shared output after a join; with
        `defer_shared` the MoE returns a `PendingSum` instead, so the two chains run to their ends and the next
        RMSNorm adds them (models/llama4.py); the routed kernels are then captured before the shared expert's
        (LLAMASERVE_MOE_ROUTED_FIRST=0: after). LLAMASERVE_SHARED_EXPERT_STREAM=0 keeps one stream."""
        sx = shared_input if shared_input is not None else x
        decode = self.decode_sized(x)
        side = _side_stream(x.device) if decode and isinstance(self.experts, FusedExperts) else None
        # decode: the router's logits in one small kernel (cuBLAS takes two at one token), before the fork (beside
        # the shared expert's GEMMs it waits for their SMs: 20 us instead of 2 on the H200)
        if logits is None:
            from llamaserve.kernels import moe_decode

            logits = moe_decode.router_logits(x, self.router.weight) if decode else self.router(x)  # [T, E]
        if side is None:
            shared = self._shared(sx, x, decode)
            return self.experts.forward_logits(x, logits, self.top_k, shared=shared)
        main = torch.cuda.current_stream(x.device)
        routed = None
        if defer_shared and os.environ.get("LLAMASERVE_MOE_ROUTED_FIRST", "1") != "0":
            # the routed chain (the longer one: its routing kernel waits behind the shared GEMM's traffic) is
            # captured first, so the graph starts it first: H200 batch-1 Scout 5.528 vs 5.548-5.564 ms per step
            fork = torch.cuda.Event()
            fork.record(main)
            routed = self.experts.forward_logits(x, logits, self.top_k)
            side.wait_event(fork)
        else:
            side.wait_stream(main)
        with torch.cuda.stream(side):
            shared_out = self._shared(sx, x, decode)

        def join() -> torch.Tensor:  # called right before the shared output is read
            main.wait_stream(side)
            return shared_out
        if defer_shared:
            return PendingSum(routed if routed is not None else self.experts.forward_logits(x, logits, self.top_k),
                              join)
        return self.experts.forward_logits(x, logits, self.top_k, shared=join)

    def _shared(self, sx: torch.Tensor, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """The shared expert; at decode size with a pre-quantized FP8 input its gate-up and SiLU run as one
        kernel (kernels/moe_decode.py `glu_decode`), the down projection on cuBLAS."""
        mlp = self.shared_expert
        gu, dn = mlp.gate_up_proj, mlp.down_proj
        if decode and sx.dtype == FP8 and gu.static_input_scale is not None and gu.bias is None:
            from llamaserve.kernels.moe_decode import glu_decode

            return dn(glu_decode(sx, gu.weight, gu.weight_scale, gu.input_scale, dn.static_input_scale, x))
        return mlp(sx)


@dataclass
class PendingSum:
    """`first + second()` not yet added: the routed experts' output and the join that yields the shared expert's
    (computed on another stream). `resolve()` adds them as the MoE would have (in the model dtype)."""

    first: torch.Tensor
    second: Callable[[], torch.Tensor]

    def resolve(self) -> torch.Tensor:
        return self.first + self.second()


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The second stream of `device` for the shared expert (one per device, made on first use), or None off CUDA
    or when LLAMASERVE_SHARED_EXPERT_STREAM=0."""
    if device.type != "cuda" or os.environ.get("LLAMASERVE_SHARED_EXPERT_STREAM", "1") == "0":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]
