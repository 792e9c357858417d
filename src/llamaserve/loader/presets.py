"""Named model presets for `--load-format dummy`: real Llama shapes with random weights.

Each preset is the `config.json` content of the public checkpoint (text model fields only), so a dummy model has
exactly the shapes, dtypes and RoPE scaling of the real one.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}

# Llama 4 text models (Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E), as text-only Llama4ForCausalLM
_LLAMA4_COMMON: dict[str, Any] = {
    "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
    "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "num_experts_per_tok": 1, "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5, "attention_chunk_size": 8192, "no_rope_layer_interval": 4, "attn_temperature_tuning": True,
    "floor_scale": 8192, "attn_scale": 0.1, "hidden_act": "silu", "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "pad_token_id": 200018, "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
    "llama-3.3-70b": {**_LLAMA3_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128},
    "llama-4-scout": {**_LLAMA4_COMMON, "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True,
                      "max_position_embeddings": 10485760,
                      "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
    "llama-4-maverick": {**_LLAMA4_COMMON, "num_local_experts": 128, "interleave_moe_layer_step": 2,
                         "use_qk_norm": False, "max_position_embeddings": 1048576, "rope_scaling": None},
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    },
}
