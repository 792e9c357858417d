"""GPU check of one kernel backend: bf16 prompt logprobs vs transformers on a random Llama (head_dim 128, GQA 4:1),
and a dummy Llama-3.1-8B (bf16, random weights) generating through the paged cache. Writes
$OUT/gpu_smoke_<backend>.json.

Run on the GPU machine:  PYTHONPATH=src python3 benchmarks/gpu_smoke.py [torch|triton]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamaserve import LLM, SamplingParams


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    backend = sys.argv[1] if len(sys.argv) > 1 else "torch"
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "backend": backend}
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
        llm = LLM(d, dtype="bfloat16", num_kv_blocks=64, kernel_backend=backend)
        ids = torch.randint(3, 512, (300,)).tolist()
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
        ours = torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:])])
        with torch.no_grad():
            ref = hf(torch.tensor([ids]).cuda()).logits[0].float().log_softmax(-1)
        ref_lp = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:]).cuda()].cpu()
        res["tiny_bf16_prompt_logprob_max_abs_diff"] = (ours - ref_lp).abs().max().item()
        res["tiny_bf16_prompt_logprob_rel_err"] = ((ours - ref_lp).norm() / ref_lp.norm()).item()
        res["tiny_bf16_first_token_match"] = out.outputs[0].token_ids[0] == int(ref[-1].argmax())
    t = time.time()
    big = LLM("llama-3.1-8b", load_format="dummy", max_seq_len=4096, kv_cache_free_gpu_memory_fraction=0.5,
              kernel_backend=backend)
    res["8b_load_s"] = time.time() - t
    res["8b_num_kv_blocks"] = big.engine.runner.num_blocks
    prompts = [[(7 * i + j) % 128000 for j in range(200 + 10 * i)] for i in range(8)]
    p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    big.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.time()
    outs = big.generate(prompts, p)
    torch.cuda.synchronize()
    res["8b_batch8_32tok_s"] = time.time() - t
    res["8b_output_lens"] = [len(o.outputs[0].token_ids) for o in outs]
    res["8b_kv_free_at_end"] = big.engine.kv_cache_manager.num_free_blocks == big.engine.runner.num_blocks
    print(json.dumps(res, indent=1))
    with open(os.path.join(out_dir, f"gpu_smoke_{backend}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
