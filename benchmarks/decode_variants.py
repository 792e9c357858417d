"""Decode step time (batch 1, or BATCH) of one model under several environment switches, from one model load.

    PYTHONPATH=src MODEL=llama-4-scout python3 benchmarks/decode_variants.py "A=1,B=0" "A=0" ...
    # each argument: comma-separated NAME=VALUE settings (or "default"); writes $OUT/decode_variants.json

For each variant the settings are put in the environment, the batch's CUDA graph is captured again (the switches
are read while a graph is captured), and BATCH requests (default 1) of 128 prompt tokens each (PROMPT_LEN sets
another) decode together:
3 rounds of 40 steps timed with a device sync at each end (median reported), FP8 weights and FP8 KV cache
(`--quantization fp8`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from llamaserve import LLM, SamplingParams
from llamaserve.executor.cuda_graphs import CudaGraphRunner


def step_ms(llm: LLM, prompt_len: int, batch: int = 1, rounds: int = 3, steps: int = 40) -> list[float]:
    params = SamplingParams(max_tokens=rounds * steps + 20, ignore_eos=True, temperature=0)
    for i in range(batch):
        llm.add_request([(7 * j + 13 * i) % 100000 + 10 for j in range(prompt_len)], params)
    for _ in range(8 + batch * prompt_len // 8192):  # prefill (8,192-token steps), settle into decode
        llm.step()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    while llm.engine.has_unfinished_requests():
        llm.step()
    return times


def main() -> None:
    model = os.environ.get("MODEL", "llama-4-scout")
    batch = int(os.environ.get("BATCH", "1"))
    llm = LLM(model, load_format="dummy", quantization="fp8", kv_cache_dtype="fp8", max_seq_len=2304,
              max_batch_size=batch, kv_cache_free_gpu_memory_fraction=0.5)
    runner = llm.engine.runner
    prompt_len = int(os.environ.get("PROMPT_LEN", "128"))
    results = []
    for spec in sys.argv[1:] or ["default"]:
        env = dict(kv.split("=", 1) for kv in spec.split(",")) if spec != "default" else {}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        old = runner.graphs
        runner.graphs = None
        del old
        torch.cuda.empty_cache()
        runner.graphs = CudaGraphRunner(runner.model, [batch], True, runner.block_size,
                                        -(-llm.config.scheduler_config.max_seq_len // runner.block_size),
                                        runner.num_blocks * runner.block_size, runner.device)
        runner.graphs.capture(quiet=True)
        times = step_ms(llm, prompt_len, batch)
        res = {"variant": spec, "step_ms_median": round(statistics.median(times), 4), "rounds_ms": times}
        print(json.dumps(res), flush=True)
        results.append(res)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = {"device": torch.cuda.get_device_name(0), "model": model, "batch_size": batch, "prompt_len": prompt_len,
           "results": results}
    with open(os.path.join(os.environ.get("OUT", "."), "decode_variants.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
