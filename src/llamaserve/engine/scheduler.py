"""Scheduler: which requests run this step and how many tokens each, under one rule.

Each request has `num_tokens` (prompt + output) and `num_computed_tokens`. Every step, under a budget of
`max_num_tokens` tokens and at most `max_batch_size` running requests, the scheduler lets computed catch up:
running requests first, oldest first (a decode needs 1 token, an unfinished prompt the rest of it, chunked to the
budget), then waiting requests in arrival order (preempted ones at the front). Prefill, chunked prefill,
decode, prefix-cache hits and recompute after preemption are all this rule.

When the KV cache runs out of blocks for a running request, the newest running request is preempted: its blocks
are freed and it goes back to the front of the waiting queue, to be recomputed (its own blocks are often still
in the prefix cache). The oldest request can always progress, since admission guarantees that one request
fits in the whole cache; so no request starves. In a step that preempted, no waiting request is admitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from llamaserve.config import SchedulerConfig
from llamaserve.engine.kv_cache_manager import KVCacheManager
from llamaserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_computed_tokens: int  # before this step
    num_new_tokens: int
    block_ids: list[int]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    finished_req_ids: set[str] = field(default_factory=set)  # ended since the last step (runner drops state)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and self._ends_by_length(req):
                i += 1  # its last token is being sampled and ends it: nothing more to compute
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv.allocate_slots(req, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: nothing newer is left running
            scheduled.append(ScheduledRequest(req, req.num_computed_tokens, num_new,
                                              self.kv.block_ids(req.request_id)))
            budget -= num_new
            i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            req = self.waiting[0]
            use_cache = req.sampling_params.prompt_logprobs is None  # cached tokens would skip their logprobs
            hits, num_cached = self.kv.get_computed_blocks(req) if use_cache else ([], 0)
            num_new = req.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.kv.allocate_slots(req, num_new, hits) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(ScheduledRequest(req, num_cached, num_new, self.kv.block_ids(req.request_id)))
            budget -= num_new

        out = SchedulerOutput(scheduled, self.finished_req_ids)
        self.finished_req_ids = set()
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests wherever they are (waiting, running); frees their blocks. Unknown ids are ignored."""
        ended = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self.kv.free(req)
            self.finished_req_ids.add(rid)
            ended.append(req)
        return ended

    def _ends_by_length(self, req: Request) -> bool:
        return req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_seq_len

    def check_stop(self, req: Request, index: int | None = None) -> RequestStatus | None:
        """After output token `index` (default: the last) is known: stop token, EOS, max_tokens or max_seq_len
        ends the request."""
        index = req.num_output_tokens - 1 if index is None else index
        token, num_out = req.output_token_ids[index], index + 1
        params = req.sampling_params
        if num_out >= params.min_tokens:
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_out >= req.max_tokens or req.num_prompt_tokens + num_out >= self.config.max_seq_len:
            return RequestStatus.FINISHED_LENGTH
        return None
