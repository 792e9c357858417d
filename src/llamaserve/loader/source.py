"""Resolve `--model` into a model source: where the weights are, what format, and the HF config.

Accepted: None (the bundled SmolLM2, see default_model.py), a directory holding config.json (+ safetensors), a
`.gguf` file (or a directory holding exactly one), or, with `load_format=dummy`, a preset name from presets.py
or any directory/config.json. Unknown paths and names raise `ConfigError` that lists what is accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaserve.config import ConfigError
from llamaserve.loader.presets import PRESETS


@dataclass
class ModelSource:
    path: str  # directory, .gguf file, or preset name
    load_format: str  # safetensors | gguf | dummy
    hf_config: Any
    tokenizer: str | None  # tokenizer location; None means "synthetic" (dummy presets)
    gguf_file: str | None = None


def make_hf_config(d: dict[str, Any]):
    """Build a transformers config from a config.json dict (text config of Llama models)."""
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", "llama")
    try:
        cfg = AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise ConfigError(f"model_type={model_type!r} is not known to transformers: {e}") from e
    text = getattr(cfg, "text_config", None)
    if model_type == "llama4" and text is not None:  # a multimodal Llama 4: serve its text model
        text.architectures = list(getattr(cfg, "architectures", None) or ["Llama4ForConditionalGeneration"])
        for key in ("tie_word_embeddings",):
            if key in d and not hasattr(text, key):
                setattr(text, key, d[key])
        return text
    return cfg


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def _gguf_source(gguf: Path) -> ModelSource:
    from llamaserve.loader.gguf_loader import read_gguf_config

    return ModelSource(str(gguf), "gguf", read_gguf_config(gguf), str(gguf), str(gguf))


def resolve_model_source(model: str | None, load_format: str = "auto") -> ModelSource:
    if model is None:
        from llamaserve.loader.default_model import default_model_dir

        model = str(default_model_dir())
    if model in PRESETS:
        if load_format not in ("auto", "dummy"):
            raise ConfigError(f"model={model!r} is a dummy preset; use load_format='dummy' (or 'auto').")
        return ModelSource(model, "dummy", make_hf_config(PRESETS[model]), None)
    path = Path(os.path.expanduser(model))
    if not path.exists():
        raise ConfigError(f"model={model!r} is neither an existing path nor a preset; give a checkpoint directory, "
                          f"a .gguf file, or one of the dummy presets: {', '.join(PRESETS)}.")
    gguf = _gguf_in(path)
    if load_format == "gguf" or (load_format == "auto" and gguf is not None and not (path / "config.json").exists()):
        if gguf is None:
            raise ConfigError(f"load_format='gguf' but {model!r} is not a .gguf file nor a folder with exactly one.")
        return _gguf_source(gguf)
    config_path = path if path.is_file() and path.name.endswith(".json") else path / "config.json"
    if not config_path.is_file():
        if load_format == "dummy" and gguf is not None:
            src = _gguf_source(gguf)
            return ModelSource(src.path, "dummy", src.hf_config, src.tokenizer, src.gguf_file)
        raise ConfigError(f"model={model!r} has no config.json; give a Hugging Face checkpoint directory or a "
                          ".gguf file.")
    hf_config = make_hf_config(json.loads(config_path.read_text()))
    model_dir = config_path.parent
    has_tokenizer = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                           "tokenizer.model"))
    tokenizer = str(model_dir) if has_tokenizer else None
    if load_format == "dummy":
        return ModelSource(str(model_dir), "dummy", hf_config, tokenizer)
    if not list(model_dir.glob("*.safetensors")):
        raise ConfigError(f"model={model!r} has no *.safetensors files; convert the checkpoint to safetensors or "
                          "use load_format='dummy' for random weights.")
    return ModelSource(str(model_dir), "safetensors", hf_config, tokenizer)
