"""Shared parts of the OpenAI handlers: errors, model check, prompt tokenizing, merging streams, logprobs, SSE.

Decisions: `model` may be omitted (the served model is used, as vLLM does); a different name is a 404 with code
`model_not_found`. Completions' `text_offset` counts characters from the start of the returned text (prompt
included when `echo`), as vLLM does. Decoded token strings come from decoding each token alone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llamaserve.engine.async_llm import AsyncLLM
from llamaserve.errors import InvalidRequestError
from llamaserve.outputs import RequestOutput, TokenLogprobs


@dataclass
class APIError(Exception):
    """An error with its HTTP status, rendered as OpenAI's `{"error": {...}}` body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ServingBase:
    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}.",
                           param="model", code="model_not_found")

    def tokenize_prompt(self, prompt: str | list[int], add_special_tokens: bool) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        vocab = self.engine.vocab_size
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        return self.tokenizer.decode(prompt), list(prompt)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def now() -> int:
        return int(time.time())


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as outputs arrive; cancelling the consumer closes them all."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                q.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 (handed to the consumer)
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def top_entries(entry: TokenLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) of one position, best first."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp.logprob) for tid, lp in ranked if lp.rank <= k][:k]


class CompletionLogprobs:
    """Builds the legacy completions `logprobs` object, incrementally (for streaming) or at once."""

    def __init__(self, serving: ServingBase, num: int) -> None:
        self.serving, self.num, self.offset = serving, num, 0

    def build(self, token_ids: list[int], entries: list[TokenLogprobs | None]) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries):
            s = self.serving.token_str(tid)
            tokens.append(s)
            offsets.append(self.offset)
            self.offset += len(s)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(entry[tid].logprob)
            top = {self.serving.token_str(t): lp for t, lp in top_entries(entry, self.num)}
            top.setdefault(s, entry[tid].logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(serving: ServingBase, token_ids: list[int], entries: list[TokenLogprobs], k: int) -> dict:
    def item(tid: int, lp: float) -> dict[str, Any]:
        s = serving.token_str(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries):
        d = item(tid, entry[tid].logprob)
        d["top_logprobs"] = [item(t, lp) for t, lp in top_entries(entry, k)]
        content.append(d)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
