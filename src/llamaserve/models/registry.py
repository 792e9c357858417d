"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

from typing import Any

from llamaserve.config import ConfigError
from llamaserve.models.llama import LlamaForCausalLM
from llamaserve.models.llama4 import Llama4ForCausalLM

MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Llama4ForConditionalGeneration": Llama4ForCausalLM,  # the text model; images are refused by the server
    "Llama4ForCausalLM": Llama4ForCausalLM,
}


def get_model_class(hf_config: Any) -> type:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        archs = {"llama": ["LlamaForCausalLM"], "llama4_text": ["Llama4ForCausalLM"]}.get(
            getattr(hf_config, "model_type", ""), [])
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ConfigError(f"architectures={archs} are not supported; supported: {', '.join(MODELS)}.")
