"""Where the host spends a batch-1 decode step under overlap scheduling: `execute_model` (input preparation, the
graph replay and the sampling launches) against the wait for the previous step's results. When `exec` is much
smaller than `wait`, the host runs ahead of the GPU and the step time is the GPU's.

    MODEL=llama-4-scout OUT=out python3 benchmarks/host_probe.py   # GPU machine; writes $OUT/host_probe.json

H200, Scout FP8, 2026-11-30 (before the one-copy inputs): exec 0.54 ms, wait 4.88 ms per step.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from llamaserve import LLM, SamplingParams
from llamaserve.executor import model_runner as mr

times: dict[str, list[float]] = {"exec": [], "wait": [], "graph_run": [], "sample": []}


def timed(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """f, with the host time of each call appended to times[name] (ms)."""

    def g(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        r = f(*a, **k)
        times[name].append((time.perf_counter() - t0) * 1e3)
        return r

    return g


def main() -> None:
    llm = LLM(os.environ.get("MODEL", "llama-4-scout"), load_format="dummy", quantization="fp8",
              kv_cache_dtype="fp8", max_seq_len=2304, max_batch_size=1, kv_cache_free_gpu_memory_fraction=0.5)
    runner = llm.engine.runner
    orig_result = mr.PendingOutput.result
    runner.execute_model = timed("exec", runner.execute_model)
    runner.graphs.run = timed("graph_run", runner.graphs.run)
    runner._sample = timed("sample", runner._sample)
    mr.PendingOutput.result = lambda self: timed("wait", orig_result)(self)
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
    llm.add_request([(7 * j) % 100000 + 10 for j in range(128)], params)
    for _ in range(10):
        llm.step()
    for v in times.values():
        v.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        llm.step()
    torch.cuda.synchronize()
    res = {"step_wall_ms": (time.perf_counter() - t0) * 10,
           **{k: round(statistics.median(v), 4) for k, v in times.items() if v}}
    print(json.dumps(res))
    with open(os.path.join(os.environ.get("OUT", "."), "host_probe.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
