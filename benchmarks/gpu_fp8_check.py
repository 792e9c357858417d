"""GPU check of the FP8 path on dummy Llama-3.1-8B: FP8 weights + FP8 KV cache against the same weights
dequantized into a bf16 model with a bf16 KV cache.

    PYTHONPATH=src python3 benchmarks/gpu_fp8_check.py [preset] [num_tokens]   # writes $OUT/fp8_check.json

Reports the relative logit error and the share of teacher-forced positions whose greedy token agrees (the
issue's bar: >= 95%), over one random-token prompt pushed through the engine's paged cache; and, to see where
the disagreement comes from, FP8 weights with a bf16 KV cache, bf16 against float32 on the same weights, and the
median gap between the bf16 model's two best logits.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from llamaserve import LLM
from llamaserve.layers.attention import ForwardBatch


def all_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    runner = llm.engine.runner
    dev, bs, n = runner.device, runner.block_size, len(ids)
    nb = -(-n // bs)
    pos = torch.arange(n, device=dev)
    batch = ForwardBatch(pos, pos.clone(), torch.arange(nb, device=dev)[None], torch.tensor([n], device=dev),
                         torch.tensor([0, n], device=dev), [n], [n], bs)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(torch.tensor(ids, device=dev), pos, batch))


def _load_into(llm: LLM, dequant: dict, others: dict) -> None:
    rm = llm.engine.runner.model
    with torch.no_grad():
        for name, m in rm.named_modules():
            if name in dequant:
                m.weight.copy_(dequant[name])
        for name, p in rm.named_parameters():
            if name in others:
                p.copy_(others[name])


def _free(*objs) -> None:
    del objs
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    kw = dict(load_format="dummy", max_seq_len=4096, num_kv_blocks=-(-n // 16) + 8, enforce_eager=True)
    fp8 = LLM(preset, quantization="fp8", kv_cache_dtype="fp8", **kw)
    ids = torch.randint(0, int(fp8.config.model_config.hf_config.vocab_size), (n,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    logits = {"fp8_w_fp8_kv": all_logits(fp8, ids).float().cpu()}
    qm = fp8.engine.runner.model
    scales = [float(m.input_scale) for m in qm.modules() if getattr(m, "input_scale", None) is not None]
    dequant = {name: (m.weight.float() * m.weight_scale).cpu()
               for name, m in qm.named_modules() if hasattr(m, "weight_scale")}
    others = {name: p.detach().float().cpu() for name, p in qm.named_parameters() if not name.endswith("_scale")
              and name.rsplit(".", 1)[0] not in dequant}
    _free(fp8, qm)
    w8 = LLM(preset, quantization="fp8", **kw)  # same seed: the same weights and calibration, bf16 KV
    logits["fp8_w_bf16_kv"] = all_logits(w8, ids).float().cpu()
    _free(w8)
    for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        ref = LLM(preset, dtype=dtype, **kw)
        _load_into(ref, dequant, others)
        logits[name] = all_logits(ref, ids).float().cpu()
        _free(ref)

    def agree(x: str, y: str) -> float:
        return (logits[x].argmax(-1) == logits[y].argmax(-1)).float().mean().item()

    def rel(x: str, y: str) -> float:
        return ((logits[x] - logits[y]).norm() / logits[y].norm()).item()

    top2 = logits["bf16"].topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    res = {"device": dev, "preset": preset, "tokens": n,
           "greedy_agreement": agree("fp8_w_fp8_kv", "bf16"), "logits_rel_err": rel("fp8_w_fp8_kv", "bf16"),
           "agreement_fp8_weights_bf16_kv_vs_bf16": agree("fp8_w_bf16_kv", "bf16"),
           "rel_err_fp8_weights_bf16_kv_vs_bf16": rel("fp8_w_bf16_kv", "bf16"),
           "agreement_bf16_vs_fp32": agree("bf16", "fp32"), "rel_err_bf16_vs_fp32": rel("bf16", "fp32"),
           "agreement_fp8_vs_fp32": agree("fp8_w_fp8_kv", "fp32"),
           "bf16_top2_margin_median": margin.median().item(), "bf16_logit_std": logits["bf16"].std().item(),
           "input_scales": {"min": min(scales), "max": max(scales), "count": len(scales)}}
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "fp8_check.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
