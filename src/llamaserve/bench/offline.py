"""`llamaserve bench throughput` and `llamaserve bench latency`: the engine in-process, no HTTP.

throughput (like `vllm bench throughput` / `trtllm-bench throughput`): `--num-prompts` random prompts of
`--input-len` token ids, each generating exactly `--output-len` tokens (ignore_eos, greedy), all submitted at once;
reports requests/s, output tokens/s and total tokens/s over the wall time of the whole run (after a one-request
warm-up).
latency (like `vllm bench latency`): a batch of `--batch-size` such prompts, `--num-iters` times after
`--num-iters-warmup`; reports the end-to-end time of the batch, the prefill time (until every request has its
first token) and the time of each decode step (= TPOT at that batch size), mean/median/p99.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from llamaserve.bench.datasets import random_requests
from llamaserve.bench.metrics import summarize_ms
from llamaserve.entrypoints.options import resolve
from llamaserve.sampling_params import SamplingParams


def _llm(ns: argparse.Namespace):
    from llamaserve.entrypoints.llm import LLM

    args, _ = resolve(ns)
    return LLM(**dataclasses.asdict(args))


def _prompts(llm: Any, n: int, input_len: int, seed: int = 0) -> list[list[int]]:
    return [r.prompt for r in random_requests(llm.tokenizer, n, input_len, 1, seed=seed, as_ids=True)]


def _write(ns: argparse.Namespace, result: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    if ns.output_json:
        Path(ns.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output_json).write_text(json.dumps(result, indent=1))


def run_throughput(ns: argparse.Namespace) -> int:
    llm = _llm(ns)
    params = SamplingParams(max_tokens=ns.output_len, ignore_eos=True, temperature=0.0)
    llm.generate(_prompts(llm, 1, ns.input_len, seed=1), SamplingParams(max_tokens=4, ignore_eos=True))
    prompts = _prompts(llm, ns.num_prompts, ns.input_len)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    _write(ns, {"elapsed_time": elapsed, "num_requests": len(prompts), "total_input_tokens": n_in,
                "total_output_tokens": n_out, "total_num_tokens": n_in + n_out,
                "requests_per_second": len(prompts) / elapsed, "output_tokens_per_second": n_out / elapsed,
                "tokens_per_second": (n_in + n_out) / elapsed, "input_len": ns.input_len,
                "output_len": ns.output_len, "num_preemptions": llm.engine.scheduler.num_preemptions,
                "device": str(llm.config.device), "model": llm.config.model_config.model})
    return 0


def _one_batch(llm: Any, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float, list[float]]:
    """(end-to-end s, prefill s, decode step times s) of one batch."""
    ids = [llm.add_request(p, params) for p in prompts]
    started: set[str] = set()
    done: set[str] = set()
    t0 = time.perf_counter()
    prefill = None
    steps: list[float] = []
    while len(done) < len(ids):
        ts = time.perf_counter()
        outs = llm.step()
        te = time.perf_counter()
        if prefill is not None:
            steps.append(te - ts)
        for o in outs:
            if o.outputs[0].token_ids:
                started.add(o.request_id)
            if o.finished:
                done.add(o.request_id)
        if prefill is None and len(started) == len(ids):
            prefill = te - t0
    return time.perf_counter() - t0, prefill or 0.0, steps


def _stats(xs: list[float]) -> dict[str, float]:
    return {k: v for k, v in summarize_ms(xs, [99]).items() if k != "std"}


def run_latency(ns: argparse.Namespace) -> int:
    llm = _llm(ns)
    params = SamplingParams(max_tokens=ns.output_len, ignore_eos=True, temperature=0.0)
    prompts = _prompts(llm, ns.batch_size, ns.input_len)
    for _ in range(ns.num_iters_warmup):
        _one_batch(llm, prompts, params)
    e2e, prefill, steps = [], [], []
    for _ in range(ns.num_iters):
        a, b, c = _one_batch(llm, prompts, params)
        e2e.append(a)
        prefill.append(b)
        steps.extend(c)
    _write(ns, {"avg_latency": float(np.mean(e2e)), "latencies": e2e, "batch_size": ns.batch_size,
                "input_len": ns.input_len, "output_len": ns.output_len, "prefill_ms": _stats(prefill),
                "decode_step_ms": _stats(steps), "num_decode_steps": len(steps),
                "device": str(llm.config.device), "model": llm.config.model_config.model})
    return 0
