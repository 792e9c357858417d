"""Weight loading: build the model for a resolved `ModelConfig` and fill its parameters.

Formats: `safetensors` (a HF directory, sharded or not; the index is honoured when present), `gguf`
(dequantized through transformers, see gguf_loader.py) and `dummy` (random weights at the real shapes, seeded,
norms at 1 so activations stay finite).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llamaserve.config import ModelConfig
from llamaserve.models.registry import get_model_class


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    for fname in files:
        with safe_open(str(model_dir / fname), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.uniform_(-0.05, 0.05, generator=generators[p.device])


def get_model(model_config: ModelConfig, device: torch.device, backend: str = "torch") -> nn.Module:
    cfg = model_config.hf_config
    cls = get_model_class(cfg)
    with torch.device(device):
        model = cls(cfg, model_config.max_seq_len, model_config.dtype, backend)
    if model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
        return model.eval()
    if model_config.load_format == "gguf":
        from llamaserve.loader.gguf_loader import iter_gguf_weights

        weights = iter_gguf_weights(model_config.gguf_file, cfg)
    else:
        weights = iter_safetensors(model_config.model)
    loaded = model.load_weights(weights)
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_config.model} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval()
