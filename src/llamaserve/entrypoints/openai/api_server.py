"""The OpenAI-compatible HTTP server (FastAPI + uvicorn). `llamaserve serve` builds it with `run_server`.

Routes: GET /health, /v1/models, /version, /tokenizer_info, /metrics; POST /v1/completions,
/v1/chat/completions, /tokenize, /detokenize; OpenAPI at /docs. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}`: 400 bad request (bad JSON, wrong type, unknown or unsupported
field, bad value, context overflow), 401 missing/wrong API key, 404 unknown model or route, 405 wrong method,
413 body over `max_body_bytes`, 429 waiting queue full (Retry-After), 503 draining or engine dead (Retry-After),
500 a bug. A client that disconnects aborts its request. SIGTERM (or Ctrl-C) stops accepting, lets in-flight
requests finish for up to `shutdown_timeout` seconds, stops the engine and exits 0; if the engine dies, in-flight
requests fail with 503 and the server exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import llamaserve
from llamaserve.engine.async_llm import AsyncLLM, QueueFullError, ServiceUnavailableError
from llamaserve.engine.core_proc import EngineDeadError
from llamaserve.entrypoints.openai.guard import Guard
from llamaserve.entrypoints.openai.metrics import ServerMetrics
from llamaserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from llamaserve.entrypoints.openai.serving import APIError, ServingBase, sse
from llamaserve.entrypoints.openai.serving_chat import ServingChat
from llamaserve.entrypoints.openai.serving_completion import ServingCompletion
from llamaserve.errors import InvalidRequestError

logger = logging.getLogger("llamaserve.server")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "default"
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = False


def to_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, (ServiceUnavailableError, EngineDeadError)):
        return APIError(503, str(e), type="service_unavailable_error", headers={"Retry-After": "5"})
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error")


def error_response(e: BaseException) -> JSONResponse:
    err = to_api_error(e)
    if err.status >= 500 and not isinstance(e, (ServiceUnavailableError, EngineDeadError)):
        logger.exception("internal error", exc_info=e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _is_union_tag(x: Any) -> bool:
    """pydantic puts the tried union member ('str', 'list[int]', ...) into an error's location."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "dict", "list") or "[" in x)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_union_tag(x)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    elif kind == "extra_forbidden":
        msg = f"unknown field {param!r}: llamaserve does not support it (remove it from the request)"
    elif kind == "missing":
        msg = f"missing required field {param!r}"
    else:
        msg = f"{param or 'body'}: {first.get('msg')}" + (f" (got {first['input']!r})" if "input" in first
                                                          and not isinstance(first["input"], dict) else "")
    return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, coro: Any) -> Any:
    """Await `coro`; if the client disconnects first, cancel it (which aborts its engine requests)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return None


async def _sse_guarded(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the 200 was sent go out as an SSE error event, then [DONE]."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:  # noqa: BLE001 (reported to the client)
        err = to_api_error(e)
        yield sse(err.body())
        yield sse("[DONE]")


def build_app(engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.attach_loop(asyncio.get_running_loop())
        yield

    app = FastAPI(title="llamaserve", version=llamaserve.__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server for the Llama family")
    completion = ServingCompletion(engine, settings.model_name)
    chat = ServingChat(engine, settings.model_name)
    base = ServingBase(engine, settings.model_name)

    app.add_exception_handler(RequestValidationError, lambda r, e: _validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        code = "request_too_large" if exc.status_code == 413 else None
        return JSONResponse(APIError(exc.status_code, msg, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def respond(raw: Request, serving: Any, req: Any) -> Response:
        try:
            prep = serving.prepare(req)
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        if req.stream:
            return StreamingResponse(_sse_guarded(serving.stream(req, prep)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await run_unless_disconnected(raw, serving.full(req, prep))
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await respond(raw, completion, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await respond(raw, chat, req)

    @app.get("/health")
    async def health() -> Response:
        if engine.healthy and not engine.draining:
            return Response(status_code=200)
        why = "draining" if engine.draining else (engine.dead_reason or "engine not stepping")
        return JSONResponse(APIError(503, f"unhealthy: {why.strip().splitlines()[-1]}",
                                     type="service_unavailable_error").body(), status_code=503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": base.now(), "owned_by": "llamaserve",
            "root": engine.config.model_config.model, "parent": None, "max_model_len": engine.max_seq_len}]}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": llamaserve.__version__}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": getattr(tok, "unk_token", None),
                "chat_template": getattr(tok, "chat_template", None), "model_max_length": engine.max_seq_len,
                "vocab_size": engine.vocab_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        try:
            base.check_model(req.model)
            if (req.prompt is None) == (req.messages is None):
                raise InvalidRequestError("give exactly one of 'prompt' and 'messages'", "prompt")
            if req.messages is not None:
                ids = chat.apply_template(req.messages, req.add_generation_prompt)
            else:
                ids = list(engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(out)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        try:
            base.check_model(req.model)
            if any(not 0 <= t < engine.vocab_size for t in req.tokens):
                raise InvalidRequestError(f"token ids must be in [0, {engine.vocab_size})", "tokens")
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        return JSONResponse({"prompt": engine.tokenizer.decode(req.tokens)})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT drains and then returns (exit 0) instead of re-raising."""

    on_signal: Any = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_signal is not None:
            self.on_signal(sig)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def run_server(engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics) -> int:
    app = build_app(engine, settings, metrics)
    guarded = Guard(app, settings.api_key, settings.max_body_bytes)
    config = uvicorn.Config(guarded, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.access_log, timeout_graceful_shutdown=settings.shutdown_timeout,
                            lifespan="on")
    server = _Server(config)
    state = {"exit_code": 0}

    def on_signal(sig: int) -> None:
        if not engine.draining:
            logger.info("got %s: draining in-flight requests (up to %.0f s), then stopping",
                        signal.Signals(sig).name, settings.shutdown_timeout)
        engine.draining = True

    def on_dead(reason: str) -> None:
        state["exit_code"] = 1
        server.should_exit = True

    server.on_signal = on_signal
    engine.on_dead = on_dead
    logger.info("serving %s on http://%s:%d", settings.model_name, settings.host, settings.port)
    try:
        server.run()
    finally:
        engine.shutdown()
    if not server.started and state["exit_code"] == 0:
        return 1  # e.g. the port was taken; uvicorn logged why
    return state["exit_code"]
