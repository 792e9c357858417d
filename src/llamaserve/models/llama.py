"""Llama dense models (Llama 2/3/3.1/3.2/3.3, SmolLM2, any `LlamaForCausalLM` config).

GQA attention with RoPE (llama3 scaling), RMSNorm, SwiGLU MLP, tied or untied embeddings. forward takes the
flattened tokens of a whole step, `(input_ids [T], positions [T], batch)`, and returns hidden states [T, H];
`compute_logits` maps the rows the sampler needs to vocabulary logits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llamaserve.layers.activation import SiluAndMul
from llamaserve.layers.attention import Attention, ForwardBatch
from llamaserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llamaserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from llamaserve.layers.norm import RMSNorm
from llamaserve.layers.quantization import QuantConfig
from llamaserve.layers.rotary import RotaryEmbedding, rope_parameters


def head_dim_of(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def make_rotary(cfg: Any, max_position: int) -> RotaryEmbedding:
    theta, scaling = rope_parameters(cfg)
    return RotaryEmbedding(head_dim_of(cfg), max_position, theta, scaling)


def add_attention_projections(module: nn.Module, cfg: Any, dtype: torch.dtype, quant: QuantConfig | None,
                              prefix: str) -> None:
    """head_dim, the fused qkv_proj, o_proj and this rank's head counts, shared by the Llama attention variants."""
    module.head_dim = head_dim_of(cfg)
    bias = bool(getattr(cfg, "attention_bias", False))
    module.qkv_proj = QKVParallelLinear(cfg.hidden_size, module.head_dim, cfg.num_attention_heads,
                                        cfg.num_key_value_heads, bias, dtype, quant, f"{prefix}.qkv_proj")
    module.num_heads, module.num_kv_heads = module.qkv_proj.num_heads, module.qkv_proj.num_kv_heads
    module.o_proj = RowParallelLinear(cfg.num_attention_heads * module.head_dim, cfg.hidden_size, bias, dtype,
                                      quant, f"{prefix}.o_proj")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, max_position: int, dtype: torch.dtype, backend: str,
                 quant: QuantConfig | None = None, prefix: str = "", rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        add_attention_projections(self, cfg, dtype, quant, prefix)
        self.rotary_emb = rotary or make_rotary(cfg, max_position)  # one cos/sin table shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        # RoPE, the KV-cache write and attention; the output is FP8 when o_proj takes a static-scaled FP8 input
        out = self.attn.forward_qkv(qkv, positions, self.rotary_emb, batch, self.o_proj.static_input_scale)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, backend: str = "torch", quant: QuantConfig | None = None,
                 prefix: str = "", intermediate_size: int | None = None) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; Llama models use 'silu'")
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], bias, dtype, quant,
                                                       f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias, dtype, quant, f"{prefix}.down_proj")
        self.act_fn = SiluAndMul(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the activation writes FP8 directly when down_proj takes a static-scaled FP8 input
        return self.down_proj(self.act_fn(self.gate_up_proj(x), self.down_proj.static_input_scale))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, max_position: int, dtype: torch.dtype, backend: str,
                 quant: QuantConfig | None = None, prefix: str = "", rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, max_position, dtype, backend, quant, f"{prefix}.self_attn", rotary)
        self.mlp = LlamaMLP(cfg, dtype, backend, quant, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # the norms write FP8 directly when the next projection takes a static-scaled FP8 input
        qkv_scale = self.self_attn.qkv_proj.static_input_scale
        if residual is None:
            residual = x
            x = self.input_layernorm(x, out_scale=qkv_scale)
        else:
            x, residual = self.input_layernorm(x, residual, out_scale=qkv_scale)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual, out_scale=self.mlp.gate_up_proj.static_input_scale)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, max_position: int, dtype: torch.dtype, backend: str,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        rotary = make_rotary(cfg, max_position)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, max_position, dtype, backend, quant, f"model.layers.{i}",
                                                      rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


class CausalLMHead:
    """What the model runner calls on every Llama-family model besides forward: logits from the LM head and the
    attention layers (their KV caches). Mixed into LlamaForCausalLM and Llama4ForCausalLM, which hold
    `lm_head` and `model.layers[i].self_attn.attn`."""

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab], float32 (upcast) or in the lm_head's dtype."""
        logits = self.lm_head.compute_logits(hidden)
        return logits.float() if upcast else logits

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class LlamaForCausalLM(CausalLMHead, nn.Module):
    # checkpoint name piece -> (fused parameter name piece, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: Any, max_position: int, dtype: torch.dtype, backend: str = "torch",
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_position, dtype, backend, quant)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, backend)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF name, tensor) pairs; returns the parameter names that were filled."""
        return load_packed_weights(self, weights, self.packed_modules_mapping)


# one expert's tensor in a per-expert MoE checkpoint: `...experts.3.gate_up_proj.weight_scale` (after q/k/v and
# gate/up are mapped to their fused names)
_EXPERT_PART = re.compile(r"\.experts\.(\d+)\.(\w+?)\.(weight|weight_scale|weight_scale_2|input_scale)$")


def load_packed_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        packed: dict[str, tuple[str, object]], rename: Any = None) -> set[str]:
    """Fill a model's parameters from (checkpoint name, tensor) pairs: checkpoint parts go into their fused
    parameter (q/k/v -> qkv_proj, gate/up -> gate_up_proj) through the parameter's weight_loader; a ModelOpt
    KV-cache scale (`...layers.N.self_attn.k_proj.k_scale` / `v_proj.v_scale`) sets layer N's attention scale.
    Per-expert tensors (`...experts.E.gate_proj.weight`, `.weight_scale`, ...) go to the fused experts' parameter
    (`experts.gate_up_proj`, `experts.gate_up_proj_weight_scale`, ...) with shard id (E, part).
    `rename(name, tensor)` may rewrite a name and tensor first, or return None to skip the tensor; NVFP4 block
    scales ([out, in / 16], rows like their weight's) go through it under their weight's name, so a row
    permutation of the weight (Llama 4's q/k) permutes them alike."""
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    attn_layers = model.attention_layers()
    loaded: set[str] = set()
    for name, tensor in weights:
        if rename is not None:
            block_scale = name.endswith(".weight_scale") and tensor.dim() == 2
            renamed = rename(name.removesuffix("_scale") if block_scale else name, tensor)
            if renamed is None:
                continue
            name, tensor = renamed
            name = name + "_scale" if block_scale else name
        if "rotary_emb.inv_freq" in name or (tied and name.startswith("lm_head.")):
            continue
        if name.endswith((".k_scale", ".v_scale")):
            layer = int(name.split(".layers.")[1].split(".")[0])
            setattr(attn_layers[layer], name.rsplit(".", 1)[1], float(tensor.float().reshape(-1)[0]))
            continue
        shard_id = None
        for ckpt_part, (fused, sid) in packed.items():
            if f".{ckpt_part}." in name:
                name, shard_id = name.replace(f".{ckpt_part}.", f".{fused}."), sid
                break
        expert = _EXPERT_PART.search(name)
        if expert is not None:
            e, proj, kind = expert.groups()
            name = f"{name[: expert.start()]}.experts.{proj}" + ("" if kind == "weight" else f"_{kind}")
            shard_id = (int(e), shard_id)
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is None:
                param.data.copy_(tensor)
            else:
                loader(param, tensor, shard_id)  # loaders cast (and quantize, for FP8 weights)
        loaded.add(name)
    return loaded
