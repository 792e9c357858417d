"""Llama 4 text model (Scout, Maverick): MoE and dense layers interleaved, iRoPE, chunked local attention.

Follows transformers' Llama4TextModel: layer i is MoE when i is in `moe_layers` (every `interleave_moe_layer_step`
layers), else a dense SwiGLU MLP of `intermediate_size_mlp`; RoPE layers (`no_rope_layers[i]` truthy) rotate
q and k, use chunked local attention (`attention_chunk_size`) and, with `use_qk_norm`, a weightless L2 (RMS)
norm of q and k after RoPE; NoPE layers attend globally and scale q by log1p(floor((pos + 1) / floor_scale)) *
attn_scale + 1 (`attn_temperature_tuning`). Llama 4 rotates interleaved pairs (x[2i], x[2i+1]); at load the rows
of q_proj and k_proj are permuted per head to the half-split layout, so the shared RoPE path and kernels apply
unchanged (q.k, the L2 norm and attention are all invariant under the same permutation of q and k).

Checkpoints: `Llama4ForConditionalGeneration` (text under `language_model.`; the vision tower and projector are
skipped: images are refused by the server) and `Llama4ForCausalLM`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llamaserve.layers.attention import Attention, ForwardBatch
from llamaserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llamaserve.layers.linear import LinearBase
from llamaserve.layers.moe import Llama4MoE, PendingSum
from llamaserve.layers.norm import RMSNorm
from llamaserve.layers.quantization import QuantConfig
from llamaserve.layers.rotary import RotaryEmbedding, rope_parameters
from llamaserve.models.llama import CausalLMHead, LlamaMLP, add_attention_projections, head_dim_of, load_packed_weights


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama4TextL2Norm: x / rms(x) over the last dim, in float32, no weight."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection, per head, from interleaved RoPE pairs to the half-split (neox) layout."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    shape = w.shape
    raw = w.view(torch.uint8) if w.dtype.itemsize == 1 else w  # FP8: index the bytes (no fp8 gather on CPU)
    return raw.reshape(-1, head_dim, *shape[1:])[:, perm].reshape(shape).view(w.dtype)


def pending(x: torch.Tensor | PendingSum) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, None), or for a MoE output whose shared-expert part is still pending: (routed, shared) after the join."""
    return (x.first, x.second()) if isinstance(x, PendingSum) else (x, None)


def moe_layers(cfg: Any) -> set[int]:
    layers = getattr(cfg, "moe_layers", None)
    if layers is not None:
        return set(layers)
    step = int(getattr(cfg, "interleave_moe_layer_step", 1))
    return set(range(step - 1, cfg.num_hidden_layers, step))


def rope_layers(cfg: Any) -> list[bool]:
    flags = getattr(cfg, "no_rope_layers", None)
    if flags:
        return [bool(f) for f in flags]
    interval = int(getattr(cfg, "no_rope_layer_interval", 4))
    return [(i + 1) % interval != 0 for i in range(cfg.num_hidden_layers)]


class Llama4Attention(nn.Module):
    def __init__(self, cfg: Any, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype, backend: str,
                 quant: QuantConfig | None, prefix: str) -> None:
        super().__init__()
        add_attention_projections(self, cfg, dtype, quant, prefix)
        self.use_rope = rope_layers(cfg)[layer]
        self.rotary_emb = rotary if self.use_rope else None
        self._tables = rotary  # the fused kernel's cos/sin (unused on NoPE layers)
        self.qk_norm_eps = float(cfg.rms_norm_eps) if self.use_rope and getattr(cfg, "use_qk_norm", False) else None
        self.temperature = (not self.use_rope) and bool(getattr(cfg, "attn_temperature_tuning", False))
        self.floor_scale, self.attn_scale = float(getattr(cfg, "floor_scale", 8192)), float(
            getattr(cfg, "attn_scale", 0.1))
        chunk = int(getattr(cfg, "attention_chunk_size", 0) or 0) if self.use_rope else 0
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, backend,
                              chunk_size=chunk)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        t, d = qkv.shape[0], self.head_dim
        attn = self.attn
        if attn.backend == "triton" and attn.kv_cache is not None and not d & (d - 1):
            # RoPE / QK-norm / temperature and the KV write (kernels/rope_kv.py, or inside the attention kernel
            # at split decode steps), then attention (FP8 out for o_proj)
            from llamaserve.kernels.paged_attention import RopeInputs

            rope = RopeInputs(positions, batch.slot_mapping, self._tables.cos_cache, self._tables.sin_cache,
                              self.use_rope, self.qk_norm_eps,
                              (self.floor_scale, self.attn_scale) if self.temperature else None)
            out = attn._triton(qkv, batch, self.o_proj.static_input_scale, rope=rope)
            return self.o_proj(out.reshape(t, self.num_heads * d))
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        if self.qk_norm_eps is not None:
            q = l2_norm(q.reshape(t, -1, d), self.qk_norm_eps).reshape(t, -1)
            k = l2_norm(k.reshape(t, -1, d), self.qk_norm_eps).reshape(t, -1)
        if self.temperature:
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, None]).to(q.dtype)
        return self.o_proj(self.attn(q, k, v, batch))


class Llama4DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype, backend: str,
                 quant: QuantConfig | None) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.self_attn = Llama4Attention(cfg, layer, rotary, dtype, backend, quant, f"{prefix}.self_attn")
        if layer in moe_layers(cfg):
            self.feed_forward = Llama4MoE(cfg, dtype, backend, quant, f"{prefix}.feed_forward", LlamaMLP)
        else:
            self.feed_forward = LlamaMLP(cfg, dtype, backend, quant, f"{prefix}.feed_forward",
                                         intermediate_size=int(cfg.intermediate_size_mlp))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | PendingSum, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor | PendingSum, torch.Tensor]:
        """x: the hidden states, or the previous MoE layer's routed and shared outputs not yet added (a
        `PendingSum`, at decode size): the input norm adds them with the residual."""
        # the norms write FP8 directly when the next projection takes a static-scaled FP8 input (the MoE's router
        # and experts take the bf16 output, its shared expert a second, FP8 copy)
        qkv_scale = self.self_attn.qkv_proj.static_input_scale
        if residual is None:
            residual = x
            x = self.input_layernorm(x, out_scale=qkv_scale)
        else:
            x, add = pending(x)
            x, residual = self.input_layernorm(x, residual, out_scale=qkv_scale, add=add)
        x = self.self_attn(positions, x, batch)
        ff = self.feed_forward
        if isinstance(ff, Llama4MoE):  # router and experts take bf16; the shared expert an FP8 copy, if static
            shared_scale = ff.shared_expert.gate_up_proj.static_input_scale
            norm = self.post_attention_layernorm
            if norm.backend == "triton" and ff.decode_sized(x) and os.environ.get("LLAMASERVE_NORM_ROUTER", "1") != "0":
                # decode: the norm and the router's logits in one kernel
                from llamaserve.kernels.moe_decode import norm_router

                x, x8, logits, residual = norm_router(x, residual, norm.weight, norm.eps, ff.router.weight,
                                                      shared_scale)
                return ff(x, shared_input=x8, defer_shared=True, logits=logits), residual
            if shared_scale is not None:
                (x, x8), residual = self.post_attention_layernorm(x, residual, fp8_copy=shared_scale)
                return ff(x, shared_input=x8, defer_shared=True), residual
            x, residual = self.post_attention_layernorm(x, residual)
            return ff(x, defer_shared=True), residual
        x, residual = self.post_attention_layernorm(x, residual, out_scale=ff.gate_up_proj.static_input_scale)
        return ff(x), residual


class Llama4ForCausalLM(CausalLMHead, nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    skipped_prefixes = ("vision_model.", "multi_modal_projector.")

    def __init__(self, cfg: Any, max_position: int, dtype: torch.dtype, backend: str = "torch",
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.supports_cuda_graphs = backend == "triton"  # the torch MoE reference groups tokens on the host
        theta, scaling = rope_parameters(cfg)
        rotary = RotaryEmbedding(head_dim_of(cfg), max_position, theta, scaling)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.model.layers = nn.ModuleList(Llama4DecoderLayer(cfg, i, rotary, dtype, backend, quant)
                                          for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, backend)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, backend)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        for module in self.model.layers.modules():  # FP8 one-token calls take the GEMV (layers/quantization.py)
            if isinstance(module, LinearBase):
                module.one_token_gemv = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, batch)
        x, add = pending(x)
        x, _ = self.model.norm(x, residual, add=add)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        head_dim = head_dim_of(self.config)

        def rename(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
            if name.startswith(self.skipped_prefixes):
                return None
            name = name.removeprefix("language_model.")
            if (".q_proj." in name or ".k_proj." in name) and name.endswith(("weight", "bias")) \
                    and tensor.dim() >= 1 and tensor.shape[0] % head_dim == 0:
                tensor = interleaved_to_half(tensor, head_dim)
            return name, tensor

        return load_packed_weights(self, weights, self.packed_modules_mapping, rename)
