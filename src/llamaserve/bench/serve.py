"""`llamaserve bench serve`: the serving benchmark, vLLM's flags, against any OpenAI-compatible server.

Requests go out at `--request-rate` (Poisson; `--burstiness` k draws gaps from a gamma distribution of shape k,
k=1 is Poisson), at most `--max-concurrency` at a time. `--concurrency-sweep 1,2,4` runs one benchmark per
concurrency with concurrency x `--multi-round` prompts (TensorRT-LLM's bench.sh), writing one JSON each.
`--use-case` sets input/output lengths from the NVIDIA benchmark recipes. Output is the "Serving Benchmark
Result" block and, with `--save-result`, a JSON with vLLM's keys plus `label`, `backend`, `model`, lengths and
concurrency, which `llamaserve bench report` reads.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from llamaserve.bench.client import ENDPOINTS, build_payload, send
from llamaserve.bench.datasets import (
    BenchRequest,
    custom_requests,
    load_tokenizer,
    random_requests,
    sharegpt_requests,
)
from llamaserve.bench.metrics import RequestRecord, compute_metrics, format_report
from llamaserve.config import ConfigError

USE_CASES = {"chat": (128, 128), "reasoning": (1000, 1000), "summarization": (8000, 512),
             "generation": (512, 8000), "quickstart": (1024, 1024)}



def _run(coro: Any) -> Any:
    """asyncio.run on uvloop when it is installed: the client reads every streamed token, and at high
    concurrency the default loop can become the bottleneck before the server does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)

def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--backend", default="openai", choices=sorted(ENDPOINTS))
    g.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default=None, help="default: /v1/completions or /v1/chat/completions")
    g.add_argument("--model", default=None, help="model name sent in requests (default: the server's first model)")
    g.add_argument("--served-model-name", default=None, help="name to send if it differs from --model")
    g.add_argument("--tokenizer", default=None, help="tokenizer for prompts and lengths (default: --model)")
    g.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY)")
    g.add_argument("--request-timeout", type=float, default=6 * 3600, help="seconds per request")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "custom"])
    d.add_argument("--dataset-path", default=None)
    d.add_argument("--use-case", choices=sorted(USE_CASES), default=None,
                   help="set random input/output lengths: " + ", ".join(f"{k} {v[0]}/{v[1]}"
                                                                     for k, v in USE_CASES.items()))
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0)
    d.add_argument("--random-prefix-len", type=int, default=0)
    d.add_argument("--random-ids", action="store_true",
                   help="accepted for TensorRT-LLM's scripts: random prompts are always drawn as random token ids")
    d.add_argument("--tokenize-on-client", action="store_true", help="send prompts as token ids (openai backend)")
    d.add_argument("--sharegpt-output-len", type=int, default=None)
    d.add_argument("--custom-output-len", type=int, default=256)
    d.add_argument("--num-prompts", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("traffic")
    t.add_argument("--max-concurrency", type=int, default=None)
    t.add_argument("--request-rate", type=float, default=float("inf"))
    t.add_argument("--burstiness", type=float, default=1.0)
    t.add_argument("--ignore-eos", action="store_true")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--concurrency-sweep", default=None, help="e.g. 1,2,4,8: one run per concurrency")
    t.add_argument("--multi-round", type=int, default=10, help="prompts per concurrency level in a sweep")
    o = p.add_argument_group("metrics and output")
    o.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    o.add_argument("--metric-percentiles", default="99")
    o.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    o.add_argument("--num-gpus", type=int, default=1, help="GPUs behind the server, for per-GPU throughput")
    o.add_argument("--label", default=None, help="name of this server in reports (default: backend and model)")
    o.add_argument("--save-result", action="store_true")
    o.add_argument("--save-detailed", action="store_true", help="keep per-request lists (ttfts, itls, ...)")
    o.add_argument("--result-dir", default=".")
    o.add_argument("--result-filename", default=None)
    o.add_argument("--disable-tqdm", action="store_true")


@dataclass
class Settings:
    url: str
    backend: str
    model: str
    selected: list[str]
    percentiles: list[float]
    goodput: dict[str, float] | None


def _parse_goodput(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, _, ms = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not ms:
            raise ConfigError(f"--goodput {item!r}: use ttft:MS, tpot:MS or e2el:MS")
        out[key] = float(ms)
    return out


async def _server_model(base: str, headers: dict[str, str]) -> str:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
                s.get(base + "/v1/models", headers=headers) as r:
            data = await r.json()
            return data["data"][0]["id"]
    except (aiohttp.ClientError, TimeoutError, KeyError, IndexError) as e:
        raise ConfigError(f"cannot ask {base}/v1/models for the model name ({type(e).__name__}: {e}); "
                          "pass --model") from None


def _intervals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    return list(rng.gamma(shape=burstiness, scale=theta, size=n))


async def run_once(reqs: list[BenchRequest], s: Settings, max_concurrency: int | None, rate: float,
                   burstiness: float, ignore_eos: bool, temperature: float, timeout_s: float, headers: dict,
                   seed: int, progress: bool) -> tuple[list[RequestRecord], float]:
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    gaps = _intervals(len(reqs), rate, burstiness, np.random.default_rng(seed))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(reqs), desc="requests")
    # NOTE: a full garbage collection of a process holding torch / transformers objects pauses the event loop for
    # up to ~0.15 s (measured on the CI machine), which lands in the TTFT / ITL of every request in flight.
    # Like vLLM's benchmark_serving, collect once and freeze what exists, so the run's collections stay small.
    gc.collect()
    gc.freeze()
    try:
        return await _run_requests(reqs, s, sem, gaps, bar, ignore_eos, temperature, timeout_s, headers)
    finally:
        gc.unfreeze()
        if bar is not None:
            bar.close()


async def _run_requests(reqs: list[BenchRequest], s: Settings, sem: asyncio.Semaphore | None, gaps: list[float],
                        bar: Any, ignore_eos: bool, temperature: float, timeout_s: float,
                        headers: dict) -> tuple[list[RequestRecord], float]:
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestRecord:
            rec = RequestRecord(req.prompt_len, req.output_len)
            payload = build_payload(s.backend, s.model, req, ignore_eos, temperature)
            if sem is None:
                await send(session, s.url, s.backend, payload, rec, t0, headers)
            else:
                async with sem:
                    await send(session, s.url, s.backend, payload, rec, t0, headers)
            if bar is not None:
                bar.update(1)
            return rec

        tasks = []
        for req, gap in zip(reqs, gaps):
            tasks.append(asyncio.ensure_future(one(req)))
            if gap:
                await asyncio.sleep(gap)
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return list(records), duration


def _retokenize(records: list[RequestRecord], tok: Any) -> None:
    for r in records:
        if r.success and r.output_tokens is None:
            r.output_tokens = len(tok.encode(r.text, add_special_tokens=False))


def _requests(ns: argparse.Namespace, tok: Any, num: int) -> list[BenchRequest]:
    """Prompts of the dataset; `--tokenize-on-client` sends them as token ids (completions only)."""
    if ns.tokenize_on_client and ns.backend != "openai":
        raise ConfigError("--tokenize-on-client sends token ids, which only --backend openai (completions) takes")
    if ns.dataset_name == "random":
        return random_requests(tok, num, ns.random_input_len, ns.random_output_len, ns.random_range_ratio,
                               ns.random_prefix_len, ns.seed, as_ids=ns.tokenize_on_client)
    if not ns.dataset_path:
        raise ConfigError(f"--dataset-name {ns.dataset_name} needs --dataset-path (a local file)")
    if ns.dataset_name == "sharegpt":
        reqs = sharegpt_requests(tok, ns.dataset_path, num, ns.seed, ns.sharegpt_output_len)
    else:
        reqs = custom_requests(tok, ns.dataset_path, num, ns.custom_output_len)
    if ns.tokenize_on_client:
        for r in reqs:
            r.prompt = list(tok.encode(r.prompt, add_special_tokens=False))
    return reqs


def apply_use_case(ns: argparse.Namespace) -> None:
    if ns.use_case:
        ns.random_input_len, ns.random_output_len = USE_CASES[ns.use_case]


def run(ns: argparse.Namespace) -> int:
    import os

    apply_use_case(ns)
    base = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    key = ns.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    percentiles = [float(p) for p in ns.metric_percentiles.split(",")]
    selected = [m.strip() for m in ns.percentile_metrics.split(",") if m.strip()]
    if bad := [m for m in selected if m not in ("ttft", "tpot", "itl", "e2el")]:
        raise ConfigError(f"--percentile-metrics: unknown {bad}; choose from ttft,tpot,itl,e2el")
    model = ns.served_model_name or ns.model or _run(_server_model(base, headers))
    tok = load_tokenizer(ns.tokenizer or ns.model or model)
    s = Settings(base + (ns.endpoint or ENDPOINTS[ns.backend]), ns.backend, model, selected, percentiles,
                 _parse_goodput(ns.goodput))
    levels = [int(c) for c in ns.concurrency_sweep.split(",")] if ns.concurrency_sweep else [ns.max_concurrency]
    label = ns.label or f"{ns.backend}-{Path(model).name}"
    for conc in levels:
        num = conc * ns.multi_round if ns.concurrency_sweep else ns.num_prompts
        reqs = _requests(ns, tok, num)
        records, duration = _run(run_once(reqs, s, conc, ns.request_rate, ns.burstiness, ns.ignore_eos,
                                                 ns.temperature, ns.request_timeout, headers, ns.seed,
                                                 not ns.disable_tqdm))
        _retokenize(records, tok)
        result = compute_metrics(records, duration, percentiles, selected, s.goodput, ns.num_gpus)
        result.update(date=datetime.now().strftime("%Y%m%d-%H%M%S"), label=label, backend=ns.backend, model=model,
                      tokenizer=ns.tokenizer or model, base_url=base, dataset_name=ns.dataset_name,
                      use_case=ns.use_case, random_input_len=ns.random_input_len,
                      random_output_len=ns.random_output_len, num_prompts=num, request_rate=ns.request_rate,
                      burstiness=ns.burstiness, max_concurrency=conc, percentiles=percentiles)
        print(format_report(result, selected, percentiles), flush=True)
        if ns.save_result or ns.concurrency_sweep:
            _save(result, ns, label, conc)
    return 0


def _save(result: dict[str, Any], ns: argparse.Namespace, label: str, conc: int | None) -> None:
    out = dict(result)
    if not ns.save_detailed:
        for k in ("input_lens", "output_lens", "ttfts", "itls", "e2els"):
            out.pop(k, None)
        out["errors"] = [e for e in out["errors"] if e]
    name = ns.result_filename if ns.result_filename and not ns.concurrency_sweep else (
        f"{label}-{ns.dataset_name}-{ns.random_input_len}-{ns.random_output_len}-c{conc or 'inf'}.json")
    path = Path(ns.result_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"saved {path}", flush=True)
