"""GPU check of the Llama 4 text model: a small random Llama4ForCausalLM (transformers) in float32 served with the
Triton kernels (fused MoE, chunked local attention) eagerly and with CUDA graphs; greedy tokens must equal
transformers' full forward step by step. Writes $OUT/llama4_check.json.

    PYTHONPATH=src python3 benchmarks/gpu_llama4_check.py
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

from llamaserve import LLM, SamplingParams


def main() -> None:
    cfg = Llama4TextConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=128, intermediate_size_mlp=384, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=1,
        interleave_moe_layer_step=1, no_rope_layer_interval=2, attention_chunk_size=32, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=16, attn_scale=0.1, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    hf = Llama4ForCausalLM(cfg).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    hf = hf.cuda()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist() for n in (5, 40, 100, 7, 64, 33)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    res: dict = {"device": torch.cuda.get_device_name(0)}
    outs = {}
    for eager in (True, False):
        llm = LLM(path, dtype="float32", kernel_backend="triton", num_kv_blocks=128, enforce_eager=eager,
                  cuda_graph_batch_sizes=[1, 2, 4, 8])
        res[f"graphs_{'off' if eager else 'on'}"] = llm.engine.runner.graphs is not None
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
    res["graphs_equal_eager"] = outs[True] == outs[False]
    match = 0
    for p, toks in zip(prompts, outs[False]):
        with torch.no_grad():
            ref = hf(torch.tensor([p + toks], device="cuda")).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
        match += ref == toks
    res["requests_equal_transformers"] = f"{match}/{len(prompts)}"
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "llama4_check.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
