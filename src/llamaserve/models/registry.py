"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

from typing import Any

from llamaserve.config import ConfigError
from llamaserve.models.llama import LlamaForCausalLM

MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
}


def get_model_class(hf_config: Any) -> type:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", "") == "llama":
        archs = ["LlamaForCausalLM"]
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ConfigError(f"architectures={archs} are not supported; supported: {', '.join(MODELS)}.")
