"""`llamaserve serve`: resolve settings, start the engine process, then the HTTP server.

Decisions: the served model name is `--served-model-name`, else the MODEL argument as given, else
`SmolLM2-135M-Instruct` for the bundled model. The API key comes from `--api-key` or `LLAMASERVE_API_KEY`.
`--max-queue-size` (default 4096) bounds the sequences waiting beyond the running batch; `--shutdown-timeout`
(default 30 s) bounds the drain after SIGTERM.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import fields
from typing import Any

from llamaserve.config import ConfigError, EngineArgs
from llamaserve.engine.core_proc import EngineDeadError

logger = logging.getLogger("llamaserve.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None


def serve(engine_args: EngineArgs, server: dict[str, Any]) -> int:
    from llamaserve.engine.async_llm import AsyncLLM
    from llamaserve.entrypoints.openai.api_server import ServerSettings, run_server
    from llamaserve.entrypoints.openai.metrics import ServerMetrics

    known = {f.name for f in fields(ServerSettings)} | {"served_model_name", "max_queue_size", "health_timeout"}
    if unknown := sorted(set(server) - known):
        raise ConfigError(f"unknown server option(s) {unknown}")
    name = server.pop("served_model_name", None) or engine_args.model or DEFAULT_MODEL_NAME
    max_queue = server.pop("max_queue_size", None) or 4096
    health_timeout = server.pop("health_timeout", None) or 60.0
    if max_queue < 1:
        raise ConfigError(f"max_queue_size={max_queue} must be at least 1")
    settings = ServerSettings(model_name=name, **{k: v for k, v in server.items() if v is not None})
    settings.api_key = settings.api_key or os.environ.get("LLAMASERVE_API_KEY") or None
    settings.log_level = settings.log_level.lower()
    _check_port(settings.host, settings.port)  # before loading a model that could take minutes
    metrics = ServerMetrics(name)
    try:
        engine = AsyncLLM(engine_args, metrics=metrics, max_queue_size=max_queue, health_timeout_s=health_timeout)
    except EngineDeadError as e:
        logger.error("%s", e)
        return 1
    return run_server(engine, settings, metrics)
