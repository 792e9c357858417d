"""GGUF files: config, dequantized weights and tokenizer, all read through transformers' GGUF support.

transformers maps GGUF metadata to a HF config and tokenizer (chat template included) and dequantizes tensors
with the `gguf` package, undoing llama.cpp's Q/K row permutation; we reuse that rather than re-implement it.
Weights come back with Hugging Face names, so models load them like a safetensors checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _config_dict(path: Path) -> dict[str, Any]:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return dict(load_gguf_checkpoint(str(path))["config"])


def read_gguf_config(path: Path | str):
    from llamaserve.loader.source import make_hf_config

    return make_hf_config(_config_dict(Path(path)))


def iter_gguf_weights(path: Path | str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, float32 tensor) for every tensor of the file."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # NOTE: transformers needs a model skeleton to map GGUF names to HF names; build it on "meta" (no memory).
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    yield from tensors.items()


def load_gguf_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
