"""Loader fixtures: the small Llama 4 text config both quantize tests write checkpoints of."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def small_llama4_config():
    """MoE on every second layer (4 experts, top-1), NoPE every second layer, chunked attention, QK-norm; a fresh
    config per test module (transformers may write into it while saving)."""
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=16, use_qk_norm=True,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.05)
