"""Tokenizers: the checkpoint's own (transformers AutoTokenizer, GGUF included) or a synthetic one for dummy models.

The synthetic tokenizer is a real `PreTrainedTokenizerFast` (a `tokenizers` WordLevel model), so every code path
that takes a HF tokenizer (chat templates, incremental detokenization, benchmarks) works unchanged. It covers the
model's whole vocabulary: id N decodes to the word `tN` (special ids to `<bos>`, `<eos>`, `<eosK>`), words are
split on whitespace, and a word outside the vocabulary maps to `tN` with N = 0 (its `unk`). So random token ids
round-trip exactly: decode(ids) re-encodes to the same ids.
"""

from __future__ import annotations

from typing import Any

from llamaserve.config import ModelConfig

SYNTHETIC_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def synthetic_tokenizer(hf_config: Any):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(hf_config.vocab_size)
    names = [f"t{i}" for i in range(vocab_size)]
    bos = _as_list(getattr(hf_config, "bos_token_id", None))
    eos = _as_list(getattr(hf_config, "eos_token_id", None))
    for i in bos:
        names[i] = "<bos>"
    for k, i in enumerate(eos):
        names[i] = "<eos>" if k == 0 else f"<eos{k}>"
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token=names[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    specials = {}
    if bos:
        specials["bos_token"] = "<bos>"
    if eos:
        specials["eos_token"] = "<eos>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=names[0], **specials)
    fast.add_special_tokens({"additional_special_tokens": [names[i] for i in bos + eos]})
    fast.chat_template = SYNTHETIC_CHAT_TEMPLATE
    return fast


def get_tokenizer(model_config: ModelConfig):
    """The tokenizer for a resolved model: its own when it has one, else the synthetic one."""
    from transformers import AutoTokenizer

    from llamaserve.loader.gguf_loader import load_gguf_tokenizer

    tok = model_config.tokenizer
    if tok is None:
        return synthetic_tokenizer(model_config.hf_config)
    if tok.endswith(".gguf"):
        return load_gguf_tokenizer(tok)
    return AutoTokenizer.from_pretrained(tok)


def eos_token_ids(tokenizer: Any, hf_config: Any, generation_eos: Any = None) -> set[int]:
    """All ids that end generation: the config's (often a list for Llama 3) plus the tokenizer's eos."""
    ids = set(_as_list(getattr(hf_config, "eos_token_id", None))) | set(_as_list(generation_eos))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
