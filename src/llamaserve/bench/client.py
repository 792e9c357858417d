"""Streaming requests to an OpenAI-compatible server (aiohttp), recording when each content chunk arrives.

Backends: `openai` (POST /v1/completions) and `openai-chat` (POST /v1/chat/completions), both with
`stream: true` and `stream_options.include_usage` so output tokens come from the server's usage. Any HTTP
error, SSE error event, dropped connection or timeout marks the request failed with the reason.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from llamaserve.bench.datasets import BenchRequest
from llamaserve.bench.metrics import RequestRecord

ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def build_payload(backend: str, model: str, req: BenchRequest, ignore_eos: bool, temperature: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": temperature, **({"ignore_eos": True} if ignore_eos else {})}
    if backend == "openai":
        body.update(prompt=req.prompt, max_tokens=req.output_len)
    else:
        content = req.prompt if isinstance(req.prompt, str) else None
        if content is None:
            raise ValueError("openai-chat takes text prompts; drop --tokenize-on-client")
        body.update(messages=[{"role": "user", "content": content}], max_completion_tokens=req.output_len)
    body.update(extra or {})
    return body


def _content(backend: str, obj: dict[str, Any]) -> tuple[str | None, bool]:
    """(text of the chunk, whether it ends its choice)."""
    choices = obj.get("choices") or []
    if not choices:
        return None, False
    c = choices[0]
    text = c.get("text") if backend == "openai" else (c.get("delta") or {}).get("content")
    return text, c.get("finish_reason") is not None


async def send(session: aiohttp.ClientSession, url: str, backend: str, payload: dict[str, Any],
               rec: RequestRecord, t0: float, headers: dict[str, str]) -> RequestRecord:
    rec.start = time.perf_counter() - t0
    parts: list[str] = []
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                rec.error = f"HTTP {resp.status}: {body}"
                return rec
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            continue
                        obj = json.loads(data)
                        if "error" in obj:
                            rec.error = f"server error event: {obj['error'].get('message', obj['error'])}"
                            return rec
                        text, final = _content(backend, obj)
                        if text or (final and not rec.chunk_times):  # a lone EOS shows only as the final chunk
                            rec.chunk_times.append(time.perf_counter() - t0)
                            parts.append(text or "")
                        usage = obj.get("usage")
                        if usage and usage.get("completion_tokens") is not None:
                            rec.output_tokens = int(usage["completion_tokens"])
                            rec.usage_tokens = True
                            if usage.get("prompt_tokens"):
                                rec.prompt_len = int(usage["prompt_tokens"])
    except TimeoutError:
        rec.error = "TimeoutError: no complete answer within --request-timeout"
        return rec
    except (aiohttp.ClientError, ConnectionError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return rec
    rec.text = "".join(parts)
    if not rec.chunk_times:
        rec.error = "the response carried no tokens"
        return rec
    rec.success = True
    return rec
