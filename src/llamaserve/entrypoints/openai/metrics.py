"""Prometheus metrics of the server, named and meant as vLLM's (`vllm:` becomes `llamaserve:`).

Gauges come from the engine's stats (sent every step and every heartbeat); counters of the engine (preemptions,
prefix-cache queries/hits, in tokens) are cumulative there and advanced here by their difference. Token
counters and latency histograms are measured in the front end as outputs arrive. One sequence (each of `n`
samples) is one request for `request_success`, TTFT, ITL and E2E latency, as in vLLM V1.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llamaserve.engine.core_proc import EngineStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"llamaserve:{name}", doc, lbl, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"llamaserve:{name}", doc, lbl, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"llamaserve:{name}", doc, lbl, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage: 1 = all blocks in use.")
        self.num_preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens of requests (counted once per prompt).")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._success = Counter("llamaserve:request_success", "Finished sequences by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Arrival at the engine to first schedule.",
                               _E2E_BUCKETS)
        self._last: EngineStats | None = None

    def on_stats(self, s: EngineStats) -> None:
        self.num_requests_running.set(s.num_running)
        self.num_requests_waiting.set(s.num_waiting)
        self.kv_cache_usage_perc.set(s.kv_cache_usage)
        last = self._last
        self.num_preemptions.inc(s.num_preemptions - (last.num_preemptions if last else 0))
        self.prefix_cache_queries.inc(s.prefix_cache_queries - (last.prefix_cache_queries if last else 0))
        self.prefix_cache_hits.inc(s.prefix_cache_hits - (last.prefix_cache_hits if last else 0))
        for q in s.queue_times:
            self.queue_time.observe(q)
        self._last = s

    def request_success(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()
