"""EngineCore: the step loop. add_request -> step() (schedule -> execute -> sample -> update) -> outputs.

Overlap scheduling (`overlap_scheduling`, on by default on CUDA): step() schedules and queues step n on the
device, and only then waits for step n-1's results and turns them into outputs, so the host's scheduling, input
preparation and output handling run while the GPU computes. Tokens sampled by a step still in flight are
placeholders (engine/request.py); a request that a pending token would end by length is not scheduled again,
one that ends on EOS / a stop token wastes one scheduled token, whose result is dropped. Steps with penalties
need the real previous tokens, so pending results are taken first. Outputs therefore lag one step; without
overlap, step() returns the outputs of the step it ran.

It validates requests at admission (so nothing waits forever): an empty prompt, a token id outside the
vocabulary, a prompt that leaves no room under `max_seq_len`, or a request that could not fit in the whole KV
cache raise `InvalidRequestError` and change nothing; other requests keep running. It knows no tokenizer:
the front end (LLM, AsyncEngine) tokenizes, detokenizes, checks stop strings and aborts what they end.
"""

from __future__ import annotations

import logging
import time

from llamaserve.config import EngineConfig
from llamaserve.engine.kv_cache_manager import KVCacheManager
from llamaserve.engine.request import PLACEHOLDER, Request, RequestStatus
from llamaserve.engine.scheduler import Scheduler, SchedulerOutput
from llamaserve.errors import InvalidRequestError
from llamaserve.executor.model_runner import ModelRunner, RunnerOutput
from llamaserve.outputs import EngineCoreOutput
from llamaserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.config = config
        self.runner = runner or ModelRunner(config)
        cc, sc = config.cache_config, config.scheduler_config
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(sc, self.kv_cache_manager)
        self.vocab_size = int(config.model_config.hf_config.vocab_size)
        self.queue_times: list[float] = []  # seconds from arrival to first schedule; drained by the engine process
        self.overlap = bool(getattr(config, "overlap_scheduling", False))
        self.pending: tuple[SchedulerOutput, object] | None = None  # the step in flight (overlap scheduling)
        capacity = self.runner.num_blocks * cc.block_size
        if capacity < sc.max_seq_len:
            logger.warning("The KV cache holds %d tokens, fewer than max_seq_len=%d: longer requests are rejected",
                           capacity, sc.max_seq_len)
        logger.info("KV capacity %d tokens; max concurrency at max_seq_len=%d: %.2f", capacity, sc.max_seq_len,
                    capacity / sc.max_seq_len)
        if getattr(config, "warmup", False):
            self.warm_up()

    def warm_up(self) -> None:
        """A few dummy requests through the step loop before the first user's, so that the kernels a real batch
        compiles on first use (Triton specializes on integer arguments: a prefill of several sequences, lengths
        that are not multiples of 16, mixed prefill + decode steps, sampled and logprob rows) compile now: the
        start-up dummy prefill is one sequence. H200, 2026-12-01 (docs/performance.md): a fresh engine's first
        batch of four 1,024-token prompts took 0.91 s without it and 0.04 s with it (benchmarks/warmup_probe.py);
        Scout served at concurrency 4 with a mean TTFT of 0.38 s (p99 0.61) where it was 3.6 s (p99 7.0). Phase one
        runs one prompt alone, phase two four at once (greedy, greedy with logprobs, seeded top-p sampling); then
        the counters the metrics read are reset. `warmup=False` skips it (default: on with CUDA)."""
        import random

        t0 = time.monotonic()
        rng = random.Random(0)
        capacity = self.runner.num_blocks * self.config.cache_config.block_size
        room = min(self.config.scheduler_config.max_seq_len, capacity // 4) - 8  # four fit at once with 5 tokens
        sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_tokens=4, ignore_eos=True)
        phases = [[(1000, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))],
                  [(1021, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)),
                   (1024, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)),
                   (37, sampled), (16, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))]]
        for phase, reqs in enumerate(phases):
            for i, (n, params) in enumerate(reqs):
                ids = [rng.randrange(self.vocab_size) for _ in range(max(1, min(n, room)))]
                self.add_request(f"__warmup-{phase}-{i}", ids, params)
            while self.has_unfinished_requests():
                self.step()
        self.queue_times.clear()
        self.scheduler.num_preemptions = 0
        self.kv_cache_manager.prefix_queries = self.kv_cache_manager.prefix_hits = 0
        logger.info("warm-up: %d dummy requests in %.1f s", sum(map(len, phases)), time.monotonic() - t0)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    eos_token_ids: set[int] | frozenset[int] = frozenset()) -> Request:
        if params.n != 1:
            raise InvalidRequestError("EngineCore takes n=1 requests; the front end fans out n > 1", "n")
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        capacity = self.runner.num_blocks * self.config.cache_config.block_size
        max_tokens = check_request(prompt_token_ids, params, self.vocab_size,
                                   self.config.scheduler_config.max_seq_len, capacity)
        req = Request(request_id, list(prompt_token_ids), params, frozenset(eos_token_ids), max_tokens)
        self.scheduler.add_request(req)
        return req

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.pending is not None

    def step(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        if self.pending is not None and self._needs_known_tokens():
            outputs += self._resolve()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.pending is not None:  # nothing new to queue: finish the step in flight
                return outputs + self._resolve()
            if self.scheduler.num_unfinished:  # admission makes this impossible; fail loudly, never spin
                raise RuntimeError(f"scheduler stalled with {self.scheduler.num_unfinished} unfinished requests")
            return outputs
        handle = self.runner.execute_model(sched)
        self._advance(sched)
        if self.pending is not None:
            outputs += self._resolve()
        self.pending = (sched, handle)
        if not self.overlap:
            outputs += self._resolve()
        return outputs

    def _needs_known_tokens(self) -> bool:
        """Penalties read the previous tokens: take the step in flight first."""
        return not self.overlap or any(r.sampling_params.has_penalties for r in self.scheduler.running)

    def _advance(self, sched: SchedulerOutput) -> None:
        """Right after queueing a step: its tokens count as computed, and what it samples is a placeholder."""
        now = time.monotonic()
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                self.queue_times.append(now - req.arrival_time)
            if req.num_computed_tokens == req.num_tokens:
                req.append_output_token(PLACEHOLDER)

    def _resolve(self) -> list[EngineCoreOutput]:
        sched, handle = self.pending
        self.pending = None
        result = handle.result() if hasattr(handle, "result") else handle
        return self._update(sched, result)

    def _update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        outputs = []
        for s in sched.scheduled:
            req = s.request
            if req.status.finished:  # ended (aborted, or stopped by an earlier token) while this step ran
                continue
            prompt_lps = result.prompt_logprobs.get(req.request_id)
            if prompt_lps:
                req.num_prompt_logprobs += len(prompt_lps)
            token = result.sampled.get(req.request_id)
            if token is None:
                if prompt_lps:
                    outputs.append(EngineCoreOutput(req.request_id, [], new_prompt_logprobs=prompt_lps))
                continue
            index = req.resolve_pending(token)
            status = self.scheduler.check_stop(req, index)
            lp = result.logprobs.get(req.request_id)
            out = EngineCoreOutput(req.request_id, [token], new_logprobs=[lp] if lp is not None else None,
                                   new_prompt_logprobs=prompt_lps, num_cached_tokens=max(req.num_cached_tokens, 0))
            if status is not None:
                self.scheduler.finish_requests([req.request_id], status)
                out.finish_reason, out.stop_reason = status.value, req.stop_reason
            outputs.append(out)
        return outputs


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_seq_len: int,
                  kv_capacity_tokens: int) -> int:
    """Admission checks shared by EngineCore and the server front end; returns the effective max_tokens."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if num_prompt >= max_seq_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_seq_len} tokens; the prompt has {num_prompt} tokens, "
            "leaving no room for output. Shorten the prompt or raise max_seq_len.", "prompt",
            "context_length_exceeded")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_seq_len - num_prompt
    if num_prompt + max_tokens > max_seq_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_seq_len} tokens; you requested {num_prompt + max_tokens} "
            f"({num_prompt} in the prompt, {max_tokens} for the output). Reduce max_tokens or the prompt.",
            "max_tokens", "context_length_exceeded")
    if num_prompt + max_tokens > kv_capacity_tokens:
        raise InvalidRequestError(
            f"the request needs up to {num_prompt + max_tokens} tokens of KV cache but the whole cache holds "
            f"{kv_capacity_tokens}; reduce max_tokens or the prompt, or give the KV cache more memory.", "max_tokens")
    return max_tokens
