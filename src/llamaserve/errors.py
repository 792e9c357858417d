"""Errors a caller can act on. The server maps InvalidRequestError to an OpenAI-style 400 naming `param`."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request (prompt or sampling parameter) is invalid; the engine keeps serving everyone else."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # OpenAI's machine-readable code, e.g. "context_length_exceeded"
