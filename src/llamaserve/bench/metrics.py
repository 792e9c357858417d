"""Serving metrics from per-request records, defined as vLLM's and TensorRT-LLM's serving benchmarks define them.

- TTFT: request sent -> first chunk with content. E2EL: request sent -> last chunk.
- TPOT of a request: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token; the
  reported TPOT statistics are over requests.
- ITL: every gap between consecutive content chunks of every request, pooled (so a request with more tokens has
  more samples: token-weighted). Our server sends one token per chunk; a server that batches tokens into a chunk
  gives fewer, longer gaps, exactly as vLLM's benchmark counts them.
- Per-user output speed of a request: (output tokens - 1) / (E2EL - TTFT) tokens/s, i.e. 1/TPOT; mean over
  requests. Output throughput per GPU = output throughput / `num_gpus`.
- Goodput: completed requests per second that meet every SLO given (`ttft`, `tpot`, `e2el` in ms).
Output tokens are the server's `usage.completion_tokens`; only when a server sends no usage are they counted by
re-tokenizing the text (and `output_tokens_from` says which). Failed requests are counted, with their error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    """One request as the client saw it. Times in seconds, relative to the benchmark start."""

    prompt_len: int
    expected_output_len: int
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried content
    output_tokens: int | None = None  # from usage, else re-tokenized (see usage_tokens)
    usage_tokens: bool = False
    text: str = ""
    success: bool = False
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens or 0
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None


def summarize_ms(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean, median, std and p<N> of seconds, in milliseconds (all 0 for no values)."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if ms.size == 0:
        ms = np.zeros(1)
    out = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(ms, p))
    return out


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    return {f"{stat}_{name}_ms": v for stat, v in summarize_ms(values_s, percentiles).items()}


def compute_metrics(records: list[RequestRecord], duration_s: float, percentiles: list[float],
                    selected: list[str], goodput_slos_ms: dict[str, float] | None = None,
                    num_gpus: int = 1) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens or 0 for r in ok)
    ttfts = [r.ttft for r in ok]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [g for r in ok for g in r.itls]
    e2els = [r.e2el for r in ok]
    speeds = [1.0 / t for t in tpots if t > 0]
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "output_throughput_per_gpu": total_out / duration_s / num_gpus,
        "num_gpus": num_gpus,
        "mean_per_user_output_speed": float(np.mean(speeds)) if speeds else 0.0,
        "output_tokens_from": "usage" if ok and all(r.usage_tokens for r in ok) else
        ("retokenized" if ok and not any(r.usage_tokens for r in ok) else "mixed"),
    }
    series = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    for name in selected:
        out.update(_stats(name, series[name], percentiles))
    if goodput_slos_ms:
        good = 0
        for r in ok:
            vals = {"ttft": r.ttft, "tpot": r.tpot if r.tpot is not None else 0.0, "e2el": r.e2el}
            if all(vals[k] * 1000.0 <= slo for k, slo in goodput_slos_ms.items()):
                good += 1
        out["request_goodput"] = good / duration_s
    out["input_lens"] = [r.prompt_len for r in records]
    out["output_lens"] = [r.output_tokens or 0 for r in records]
    out["ttfts"] = [r.ttft if r.success else 0.0 for r in records]
    out["itls"] = [r.itls if r.success else [] for r in records]
    out["e2els"] = [r.e2el if r.success else 0.0 for r in records]
    out["errors"] = [r.error for r in records]
    return out


def format_report(result: dict[str, Any], selected: list[str], percentiles: list[float]) -> str:
    """The familiar "Serving Benchmark Result" block."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if "request_goodput" in result:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total Token throughput (tok/s):", result["total_token_throughput"])
    row("Output throughput per GPU (tok/s):", result["output_throughput_per_gpu"])
    row("Per-user output speed (tok/s/user):", result["mean_per_user_output_speed"])
    titles = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
              "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}
    for name in selected:
        title, short = titles[name]
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {short} (ms):", result[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", result[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{p:g} {short} (ms):", result[f"p{p:g}_{name}_ms"])
    lines.append("=" * 50)
    errors = [e for e in result.get("errors", []) if e]
    if errors:
        lines.append(f"{len(errors)} failed; first errors:")
        lines.extend(f"  {e[:200]}" for e in dict.fromkeys(errors) if e)
    return "\n".join(lines[:60])
