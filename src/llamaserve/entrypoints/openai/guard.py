"""ASGI middleware in front of the app: API key on every route but /health, and a cap on the request body.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnect detection pass through untouched.
The key is compared in constant time; a body larger than the cap, declared or streamed chunked, gets 413.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.exceptions import HTTPException

from llamaserve.entrypoints.openai.serving import APIError


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI re-raises HTTPExceptions from body parsing, so the app renders a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


async def _send_error(send: Any, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                return
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, f"the request body has {int(declared)} bytes; the limit is {limit}",
                              "request_too_large")
            return
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if not started:
                await _send_error(send, 413, e.detail, "request_too_large")
