"""Per-step time breakdown with torch.profiler: where a decode step of dummy Llama-3.1-8B bf16 goes.

    PYTHONPATH=src python3 benchmarks/profile_step.py [batch_sizes] [kernel_backend] [fp8|nvfp4] [prompt_len]
    # batch_sizes: one or several, comma-separated ("1,64"): the model loads once and each is profiled in turn
    # writes $OUT/profile_b{N}[_fp8][_p{prompt_len}].json; "fp8" = --quantization fp8 --kv-cache-dtype fp8,
    # "nvfp4" = --quantization nvfp4 --kv-cache-dtype fp8
    # MODEL=llama-4-scout (a preset; default llama-3.1-8b) profiles another model, named in the file
    # TIMELINE=1 adds the GPU timeline of the last 2 profiled steps ("timeline": name, stream, start, duration)

Runs `batch_size` requests of 128 prompt tokens to steady decode, times 20 decode steps without the profiler
("step_wall_unprofiled_ms"), then profiles 20 more. GPU kernel time
is summed by category (attention, GEMM, norm, activation, sampling, copies, other); "GPU idle" is the wall
time of the steps minus the GPU busy time, i.e. host work the GPU waits for (launches, input preparation,
sampling on the host, the per-step sync).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from llamaserve import LLM, SamplingParams

CATEGORIES = [
    ("attention", r"paged_attn|flash|attention"),
    ("moe", r"moe|align"),
    ("gemm", r"gemm|cutlass|nvjet|sm90_|sm80_|cublas|matmul|splitK"),
    ("norm", r"rms_norm"),
    ("activation", r"silu"),
    ("sampling", r"softmax|sort|topk|argmax|multinomial|exponential|log_softmax|cumsum|scatter|gather"),
    ("copies", r"copy|Memcpy|Memset|index|cat|fill"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def main() -> None:
    batches = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1").split(",")]
    backend = sys.argv[2] if len(sys.argv) > 2 else "auto"
    quant = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] in ("fp8", "nvfp4") else None
    plen = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    extra = {"quantization": quant, "kv_cache_dtype": "fp8"} if quant else {}
    model = os.environ.get("MODEL", "llama-3.1-8b")
    llm = LLM(model, load_format="dummy", max_seq_len=4096, kv_cache_free_gpu_memory_fraction=0.8,
              kernel_backend=backend, max_batch_size=max(256, *batches), **extra)
    for batch in batches:
        profile_batch(llm, model, batch, quant, plen)


def profile_batch(llm: LLM, model: str, batch: int, quant: str | None, plen: int) -> None:
    settle, steps = 10 + batch * plen // 8192, 20
    params = SamplingParams(max_tokens=settle + 2 * steps + 4, ignore_eos=True, temperature=0)
    for i in range(batch):
        llm.add_request([(7 * i + j) % 100000 + 10 for j in range(plen)], params)
    for _ in range(settle):  # prefill and settle into decode
        llm.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()  # the same number of steps without the profiler's overhead first
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    unprofiled = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while llm.engine.has_unfinished_requests():  # drain, so the next batch size starts from an empty engine
        llm.step()
    by_cat: dict[str, float] = {}
    launches = 0
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        # NOTE: operator and runtime events (`aten::mm`, `cudaStreamIsCapturing`) can carry their kernels' device
        # time again; only kernels and memcpys are counted
        if dev_us and evt.device_type == torch.autograd.DeviceType.CUDA and not evt.key.startswith(("aten::", "cuda")):
            by_cat[category(evt.key)] = by_cat.get(category(evt.key), 0.0) + dev_us / 1e3
            launches += evt.count
    busy = sum(by_cat.values())
    res = {"device": torch.cuda.get_device_name(0), "model": model, "batch_size": batch,
           "backend": llm.config.kernel_backend, "quantization": quant,
           "steps": steps, "step_wall_ms": wall * 1e3 / steps, "step_wall_unprofiled_ms": unprofiled * 1e3 / steps,
           "gpu_busy_ms_per_step": busy / steps,
           "gpu_idle_ms_per_step": wall * 1e3 / steps - busy / steps,
           "kernels_per_step": launches / steps,
           "gpu_ms_per_step_by_category": {k: v / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])}}
    res["top_kernels"] = [(e.key[:80], round((getattr(e, "self_device_time_total", 0) or 0) / 1e3 / steps, 4))
                          for e in sorted(prof.key_averages(), key=lambda e: -(getattr(e, "self_device_time_total",
                                                                                           0) or 0))[:25]]
    if os.environ.get("TIMELINE") == "1":  # the GPU timeline of the last 2 profiled steps, kernels only
        res["timeline"] = timeline(prof, 2)
    print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=1))
    tag = "" if model == "llama-3.1-8b" else f"{model}_"
    name = f"profile_{tag}b{batch}{f'_{quant}' if quant else ''}{f'_p{plen}' if plen != 128 else ''}.json"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(res, f, indent=1)


def timeline(prof, steps: int) -> list:
    """[name, stream, start_us, dur_us] of every GPU kernel / memcpy in the last `steps` steps (from the chrome
    trace; steps end at the per-step device-to-host copy), start relative to the first."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as g:
            events = json.load(g)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])
    ends = [i for i, e in enumerate(gpu) if "DtoH" in e["name"]]
    first = ends[-steps - 1] + 1 if len(ends) > steps else 0
    t0 = gpu[first]["ts"]
    return [[e["name"][:48], e.get("tid"), round(e["ts"] - t0, 2), round(e["dur"], 2)] for e in gpu[first:]]


if __name__ == "__main__":
    main()
