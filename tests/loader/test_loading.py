"""Model sources: GGUF straight from the file, dummy presets at real shapes, config validation errors."""

from __future__ import annotations

import pytest
import torch

from llamaserve import LLM, ConfigError, EngineArgs, SamplingParams
from llamaserve.loader.default_model import bundled_gguf_path

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def test_gguf_file_loads_with_its_tokenizer_and_matches_the_converted_dir(smollm2_dir):
    gguf = LLM(str(bundled_gguf_path()), max_seq_len=512, num_kv_blocks=64)
    assert gguf.config.model_config.load_format == "gguf"
    assert "<|im_start|>" in gguf.tokenizer.chat_template
    conv = LLM(str(smollm2_dir), max_seq_len=512, num_kv_blocks=64)
    prompt = "The capital of France is"
    assert gguf.tokenizer.encode(prompt) == conv.tokenizer.encode(prompt)
    ours = gguf.generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert ours == conv.generate(prompt, GREEDY)[0].outputs[0].token_ids


@pytest.mark.parametrize("preset,hidden,layers,max_len", [
    ("llama-3.1-8b", 4096, 32, 131072), ("llama-3.3-70b", 8192, 80, 131072), ("smollm2-135m", 576, 30, 8192)])
def test_presets_resolve_to_real_shapes(preset, hidden, layers, max_len):
    cfg = EngineArgs(model=preset, load_format="dummy", device="cpu").create_engine_config()
    hf = cfg.model_config.hf_config
    assert (hf.hidden_size, hf.num_hidden_layers, cfg.model_config.max_seq_len) == (hidden, layers, max_len)
    assert cfg.model_config.load_format == "dummy" and cfg.model_config.tokenizer is None


def test_dummy_model_runs_end_to_end_with_synthetic_tokenizer():
    llm = LLM("smollm2-135m", load_format="dummy", max_seq_len=256, num_kv_blocks=32, dtype="bfloat16")
    assert len(llm.tokenizer) == 49152
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    c = out.outputs[0]
    assert len(c.token_ids) == 6
    assert c.text.split() == [f"t{i}" for i in c.token_ids if i not in llm.eos_token_ids and i != 1]
    assert llm.tokenizer.encode("t5 t6 t49151", add_special_tokens=False) == [5, 6, 49151]


def test_dummy_from_config_dir_and_fp8_kv_cache(tiny_llama_dir):
    exact = LLM(str(tiny_llama_dir), num_kv_blocks=16, block_size=8)
    fp8 = LLM(str(tiny_llama_dir), num_kv_blocks=16, block_size=8, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    prompt = [[3, 17, 99, 240, 5, 77, 300, 12]]
    p = SamplingParams(temperature=0, max_tokens=4, logprobs=1, ignore_eos=True)
    a, b = exact.generate(prompt, p)[0].outputs[0], fp8.generate(prompt, p)[0].outputs[0]
    assert len(b.token_ids) == 4 and all(abs(e[t].logprob) < 50 for e, t in zip(b.logprobs, b.token_ids))
    assert a.token_ids != [] and fp8.engine.kv_cache_manager.num_free_blocks == 16  # precision: test_attention
    dummy = LLM(str(tiny_llama_dir), load_format="dummy", num_kv_blocks=16)
    assert dummy.config.model_config.load_format == "dummy"
    assert len(dummy.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids) >= 1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model="no/such/model"), "neither an existing path nor a preset"),
    (dict(model="llama-9b-nonexistent"), "llama-3.1-8b"),
    (dict(model="smollm2-135m", max_num_tokens=8, block_size=16), "max_num_tokens=8 is smaller than block_size"),
    (dict(model="smollm2-135m", max_seq_len=10000), "max_seq_len=10000 is larger"),
    (dict(model="smollm2-135m", kv_cache_free_gpu_memory_fraction=0), "kv_cache_free_gpu_memory_fraction"),
    (dict(model="smollm2-135m", kv_cache_dtype="int3"), "kv_cache_dtype"),
    (dict(model="smollm2-135m", block_size=12), "block_size=12"),
    (dict(model="smollm2-135m", max_batch_size=0), "max_batch_size"),
    (dict(model="smollm2-135m", enable_chunked_prefill=False, max_num_tokens=512), "chunked prefill"),
    (dict(model="smollm2-135m", load_format="safetensors"), "load_format='dummy'"),
    (dict(model="smollm2-135m", tp_size=2), "tp_size"),
])
def test_config_errors_name_option_and_fix(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        EngineArgs(**kwargs).create_engine_config()


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        EngineArgs(model="smollm2-135m", device="cuda").create_engine_config()


def test_unknown_engine_option_is_named():
    with pytest.raises(ConfigError, match="max_batchsize"):
        LLM("smollm2-135m", max_batchsize=4)
