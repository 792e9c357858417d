"""Shared fixtures: the bundled SmolLM2 (converted once per machine), its transformers twin, a tiny Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU; set before triton imports

LONG_TEXT = (
    "The history of computing is a story of layers. Mechanical calculators gave way to relays, relays to vacuum "
    "tubes, tubes to transistors, and transistors to integrated circuits holding billions of switches. Each "
    "layer hid the one below it: programmers stopped thinking about voltages, then about machine code, then "
    "about memory addresses. "
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from llamaserve.loader.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random Llama with untied embeddings and llama3 RoPE scaling, saved as sharded safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    return path
