"""AsyncLLM: the server's front end of the engine (asyncio side; the engine core runs in its own process).

It owns the tokenizer and the OutputProcessor, checks a request before it reaches the engine (so a bad request is
refused before any response byte is sent), fans `n` out, and hands each caller an async iterator of
RequestOutputs. A caller that stops iterating (client gone, task cancelled) aborts its request, which frees its
KV blocks in the engine. Engine messages arrive on a reader thread and are handled on the event loop.

Admission control: at most `max_queue_size` sequences may wait beyond the engine's running batch (in flight minus
running, as of the engine's latest stats); the excess gets `QueueFullError` (HTTP 429 with Retry-After). While
draining (SIGTERM) or once the engine is dead, new requests get `ServiceUnavailableError` (503). Health is "engine
process alive and a message from it within `health_timeout_s`" (it sends one every step and every heartbeat while
idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llamaserve.config import EngineArgs
from llamaserve.engine.core_proc import EngineCoreClient, EngineDeadError, EngineStats
from llamaserve.engine.engine_core import check_request
from llamaserve.engine.output_processor import OutputProcessor, child_id
from llamaserve.errors import InvalidRequestError
from llamaserve.loader.tokenizer import eos_token_ids, get_tokenizer
from llamaserve.outputs import EngineCoreOutput, RequestOutput
from llamaserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class ServiceUnavailableError(RuntimeError):
    """The server is draining or its engine is dead."""


@dataclass
class _SeqTimes:
    arrival: float
    first_token: float | None = None
    last_token: float | None = None


class AsyncLLM:
    def __init__(self, engine_args: EngineArgs, metrics: Any = None, max_queue_size: int = 4096,
                 health_timeout_s: float = 60.0) -> None:
        self.config = engine_args.create_engine_config()
        self.tokenizer = get_tokenizer(self.config.model_config)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.config.model_config.hf_config)
        self.processor = OutputProcessor(self.tokenizer)
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.health_timeout_s = health_timeout_s
        self.queues: dict[str, asyncio.Queue] = {}
        self.seq_times: dict[str, _SeqTimes] = {}
        self.num_inflight = 0  # sequences added and not yet finished or aborted
        self.stats: EngineStats | None = None
        self.dead_reason: str | None = None
        self.draining = False
        self.last_message = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_dead: Any = None  # callback(reason) set by the server
        self.client = EngineCoreClient(self.config, self._on_message)
        info = self.client.info
        self.kv_capacity_tokens = info["num_blocks"] * info["block_size"]
        self.vocab_size = info["vocab_size"]
        self.max_seq_len = info["max_seq_len"]
        logger.info("engine process pid %d ready on %s", info["pid"], info["device"])

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    # ---- engine messages (reader thread -> loop) ----
    def _on_message(self, msg: tuple) -> None:
        self.last_message = time.monotonic()
        if self.loop is None or self.loop.is_closed():
            if msg[0] == "dead":
                self.dead_reason = msg[1]
            return
        self.loop.call_soon_threadsafe(self._handle, msg)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            outputs, stats = msg[1], msg[2]
            self.stats = stats
            if self.metrics is not None:
                self.metrics.on_stats(stats)
            if outputs:
                self._on_outputs(outputs)
        elif kind == "rejected":
            _, cid, message, param = msg
            rid = cid if cid in self.queues else cid.rsplit("-", 1)[0]  # n > 1: child "{rid}-{i}"
            if rid in self.queues:
                self._fail(rid, InvalidRequestError(message, param))
        elif kind == "dead":
            self.dead_reason = msg[1]
            logger.error("the engine died:\n%s", msg[1])
            for rid in list(self.queues):
                self._fail(rid, EngineDeadError("the engine stopped while serving this request"))
            if self.on_dead is not None:
                self.on_dead(msg[1])

    def _fail(self, rid: str, exc: BaseException) -> None:
        self.queues[rid].put_nowait(exc)
        ids = self.processor.abort(rid)
        if ids and self.dead_reason is None:
            self._abort_in_engine(ids)

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            t = self.seq_times.get(out.request_id)
            if t is None:
                continue
            if out.new_token_ids and m is not None:
                m.generation_tokens.inc(len(out.new_token_ids))
                if t.first_token is None:
                    m.ttft.observe(now - t.arrival)
                else:
                    m.itl.observe(now - t.last_token)
            if out.new_token_ids:
                t.first_token = t.first_token or now
                t.last_token = now
            if out.finished:
                self._seq_done(out.request_id, out.finish_reason)
        request_outputs, to_abort = self.processor.process(outputs)
        for cid in to_abort:  # ended by a stop string in the front end
            self._seq_done(cid, "stop")
        if to_abort:
            self._abort_in_engine(to_abort, count=False)
        for ro in request_outputs:
            q = self.queues.get(ro.request_id)
            if q is not None:
                q.put_nowait(ro)

    def _seq_done(self, cid: str, reason: str | None) -> None:
        t = self.seq_times.pop(cid, None)
        if t is None:
            return
        self.num_inflight -= 1
        if self.metrics is not None:
            self.metrics.request_success(reason or "abort")
            self.metrics.e2e.observe(time.monotonic() - t.arrival)

    def _abort_in_engine(self, ids: list[str], count: bool = True) -> None:
        if count:
            for cid in ids:
                self._seq_done(cid, "abort")
        with contextlib.suppress(EngineDeadError):
            self.client.send(("abort", ids))

    # ---- public API ----
    @property
    def healthy(self) -> bool:
        return (self.dead_reason is None and self.client.proc.is_alive()
                and time.monotonic() - self.last_message < self.health_timeout_s)

    @property
    def num_waiting(self) -> int:
        running = self.stats.num_running if self.stats is not None else 0
        return max(0, self.num_inflight - running)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the engine would refuse this prompt."""
        check_request(prompt_token_ids, params, self.vocab_size, self.max_seq_len, self.kv_capacity_tokens)

    def admit(self, num_seqs: int) -> None:
        """Raise if the server cannot take `num_seqs` more sequences now."""
        if self.dead_reason is not None:
            raise ServiceUnavailableError("the engine is not running; the server cannot serve requests")
        if self.draining:
            raise ServiceUnavailableError("the server is shutting down and takes no new requests")
        if self.num_waiting + num_seqs > self.max_queue_size:
            raise QueueFullError(f"the server's waiting queue is full ({self.num_waiting} sequences waiting, "
                                 f"limit {self.max_queue_size}); retry later")

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs of one prompt (all n samples); closing the iterator early aborts it."""
        self.check(prompt_token_ids, params)
        self.admit(params.n)
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        pairs = self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        now = time.monotonic()
        for cid, _ in pairs:
            self.seq_times[cid] = _SeqTimes(now)
        self.num_inflight += len(pairs)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        finished = False
        try:
            self.client.send(("add", [(cid, prompt_token_ids, p, self.eos_token_ids) for cid, p in pairs]))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # already aborted by whoever failed it
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self.queues.pop(request_id, None)
            if not finished:
                ids = self.processor.abort(request_id)
                if ids:
                    self._abort_in_engine(ids)
            for i in range(params.n):  # children that finished already were popped; count the rest
                cid = child_id(request_id, i, params.n)
                if cid in self.seq_times:
                    self._seq_done(cid, "abort")

    def shutdown(self) -> None:
        self.client.shutdown()
