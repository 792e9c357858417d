"""The whole model with kernel_backend="triton" gives transformers' greedy tokens (CPU: Triton's interpreter)."""

from __future__ import annotations

import torch

from llamaserve.entrypoints.llm import LLM
from llamaserve.sampling_params import SamplingParams


def test_triton_backend_greedy_matches_transformers(tiny_llama_dir, device):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(device).eval()
    llm = LLM(str(tiny_llama_dir), kernel_backend="triton", device=device.type, dtype="float32", num_kv_blocks=64,
              max_num_tokens=64)
    prompts = [[5, 9, 3], list(range(1, 90)), [7] * 40]  # the long one is chunked (max_num_tokens 64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p], device=device), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
    assert llm.config.kernel_backend == "triton"
