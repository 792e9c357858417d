"""EngineCore: the step loop. add_request -> step() (schedule -> execute -> sample -> update) -> outputs.

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
from llamaserve.engine.request import Request, RequestStatus
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
        capacity = self.runner.num_blocks * cc.block_size
        if capacity < sc.max_seq_len:
            logger.warning("The KV cache holds %d tokens, fewer than max_seq_len=%d: longer requests are rejected",
                           capacity, sc.max_seq_len)
        logger.info("KV capacity %d tokens; max concurrency at max_seq_len=%d: %.2f", capacity, sc.max_seq_len,
                    capacity / sc.max_seq_len)

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
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.has_unfinished_requests():  # admission makes this impossible; fail loudly, never spin
                raise RuntimeError(f"scheduler stalled with {self.scheduler.num_unfinished} unfinished requests")
            return []
        return self._update(sched, self.runner.execute_model(sched))

    def _update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        outputs = []
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                self.queue_times.append(req.first_scheduled_time - req.arrival_time)
            prompt_lps = result.prompt_logprobs.get(req.request_id)
            if prompt_lps:
                req.num_prompt_logprobs += len(prompt_lps)
            token = result.sampled.get(req.request_id)
            if token is None:
                if prompt_lps:
                    outputs.append(EngineCoreOutput(req.request_id, [], new_prompt_logprobs=prompt_lps))
                continue
            req.append_output_token(token)
            status = self.scheduler.check_stop(req)
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
