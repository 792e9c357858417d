"""Time to the first token of a fresh engine's first multi-sequence batch, with and without the start-up warm-up.

    PYTHONPATH=src MODEL=smollm2-135m python3 benchmarks/warmup_probe.py   # writes $OUT/warmup_probe.json

Two child processes run at once, each with its own empty Triton cache (so each compiles what it needs, as a
fresh server does): one with `warmup=False`, one with `warmup=True`. Each builds the engine (dummy weights, FP8,
FP8 KV cache, CUDA graphs up to batch 16), then times two batches of four random 1,024-token prompts (8 greedy
tokens each): the first batch pays any kernel compiles the start-up left, the second shows the steady cost.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time


def child(warm: bool) -> dict:
    from llamaserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(os.environ.get("MODEL", "smollm2-135m"), load_format="dummy", quantization="fp8",
              kv_cache_dtype="fp8", max_seq_len=2304, max_batch_size=16, kv_cache_free_gpu_memory_fraction=0.3,
              warmup=warm)
    res = {"warmup": warm, "start_s": round(time.perf_counter() - t0, 1)}
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for name in ("first_batch_s", "second_batch_s"):
        prompts = [[rng.randrange(1000, 30000) for _ in range(1024)] for _ in range(4)]
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        res[name] = round(time.perf_counter() - t0, 2)
    return res


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] == "1")))
        return
    procs = []
    for warm in ("0", "1"):
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton-{warm}-"))
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", warm], env=env, stdout=subprocess.PIPE,
                                      text=True))
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    for r in results:
        print(json.dumps(r), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "warmup_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
