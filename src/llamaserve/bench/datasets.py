"""Benchmark prompts: `random` (exact token lengths), `sharegpt` and `custom` (local files only).

Random prompts: input lengths uniform in [L(1-r), L(1+r)] (vLLM's `--random-range-ratio`), an optional shared
random prefix, token ids drawn with a seed. Unless `--random-ids` with `--tokenize-on-client` sends the ids
themselves, the ids are decoded to text, and the text is re-encoded and trimmed or extended until it
re-tokenizes to the requested length (so the server sees the length asked for, within 1%, usually exactly).

Tokenizer: `--tokenizer`, else `--model`, resolved as `llamaserve serve` resolves a model (checkpoint dir, .gguf,
dummy preset with its synthetic tokenizer, or the served name of the bundled model), else as a Hugging Face
tokenizer name.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaserve.config import ConfigError


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def load_tokenizer(name: str | None) -> Any:
    from llamaserve.entrypoints.openai.serve import DEFAULT_MODEL_NAME
    from llamaserve.loader.presets import PRESETS

    if name in (None, DEFAULT_MODEL_NAME) or name in PRESETS or (name and Path(name).exists()):
        from llamaserve.config import EngineArgs
        from llamaserve.loader.tokenizer import get_tokenizer

        model = None if name == DEFAULT_MODEL_NAME else name
        return get_tokenizer(EngineArgs(model=model, device="cpu").create_engine_config().model_config)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 (hub or path errors, reworded)
        raise ConfigError(f"cannot load tokenizer {name!r}: {e}. Pass --tokenizer with a local checkpoint "
                          "directory, a .gguf file or a dummy preset name.") from None


def _special_ids(tok: Any) -> set[int]:
    return set(getattr(tok, "all_special_ids", []) or [])


def _text_of_length(tok: Any, ids: list[int], target: int, rng: random.Random, vocab: list[int]) -> tuple[str, int]:
    """Decode ids, then trim/extend until the text re-encodes to `target` tokens (best effort in 10 rounds)."""
    text = tok.decode(ids)
    n = len(tok.encode(text, add_special_tokens=False))
    for _ in range(10):
        if n == target:
            break
        cur = tok.encode(text, add_special_tokens=False)
        if len(cur) > target:
            cur = cur[:target]
        else:
            cur = cur + [rng.choice(vocab) for _ in range(target - len(cur))]
        text = tok.decode(cur)
        n = len(tok.encode(text, add_special_tokens=False))
    return text, n


def random_requests(tok: Any, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    prefix_len: int = 0, seed: int = 0, as_ids: bool = False) -> list[BenchRequest]:
    if not 0.0 <= range_ratio < 1.0:
        raise ConfigError(f"--random-range-ratio={range_ratio} must be in [0, 1)")
    if input_len < 1 or output_len < 1:
        raise ConfigError("--random-input-len and --random-output-len must be at least 1")
    rng = random.Random(seed)
    special = _special_ids(tok)
    vocab = [i for i in range(len(tok)) if i not in special]
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]
    out = []
    for _ in range(num):
        n_in = rng.randint(int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio)))
        n_out = rng.randint(max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio)))
        ids = prefix + [rng.choice(vocab) for _ in range(max(1, n_in))]
        if as_ids:
            out.append(BenchRequest(ids, len(ids), n_out))
        else:
            text, n = _text_of_length(tok, ids, len(ids), rng, vocab)
            out.append(BenchRequest(text, n, n_out))
    return out


def sharegpt_requests(tok: Any, path: str, num: int, seed: int = 0,
                      fixed_output_len: int | None = None) -> list[BenchRequest]:
    """First human turn as the prompt, the reply's token count as output length (vLLM's filters)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --dataset-path {path}: {e.strerror}") from None
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    out = []
    for conv in convs:
        prompt, reply = conv[0]["value"], conv[1]["value"]
        n_in = len(tok.encode(prompt, add_special_tokens=False))
        n_out = fixed_output_len or len(tok.encode(reply, add_special_tokens=False))
        if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
            continue
        out.append(BenchRequest(prompt, n_in, n_out))
        if len(out) == num:
            break
    if len(out) < num:
        raise ConfigError(f"{path} holds only {len(out)} usable conversations; asked for {num}")
    return out


def custom_requests(tok: Any, path: str, num: int, output_len: int) -> list[BenchRequest]:
    """JSONL with a "prompt" per line and optionally "output_tokens" (else --custom-output-len)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read --dataset-path {path}: {e.strerror}") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{i + 1}: each line must be a JSON object with a \"prompt\"") from None
        n_out = int(row.get("output_tokens", output_len))
        out.append(BenchRequest(prompt, len(tok.encode(prompt, add_special_tokens=False)), n_out))
        if len(out) == num:
            break
    if len(out) < num:
        raise ConfigError(f"{path} holds only {len(out)} prompts; asked for {num}")
    return out
