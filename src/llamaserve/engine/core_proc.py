"""The engine-core process: EngineCore's step loop behind two one-way pipes, and the client that starts it.

The server's HTTP process tokenizes, detokenizes and streams; this process only schedules and runs the model.
IPC is `multiprocessing.connection` (a Unix socket pair, messages pickled once per step): the front end sends
`("add", [(id, prompt_ids, params, eos_ids), ...])`, `("abort", [ids])` and `("shutdown",)`; the engine sends
`("ready", info)`, one `("step", outputs, stats)` per step (and a heartbeat with stats every
`HEARTBEAT_S` while idle), `("rejected", id, message, param)` for a request it refuses, and `("dead", traceback)`
before exiting on an error. The engine exits by itself when the front end goes away (pipe closed or parent gone).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamaserve.config import EngineConfig
from llamaserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5


@dataclass
class EngineStats:
    """A snapshot the engine sends with every step and heartbeat (counters are cumulative)."""

    time: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    queue_times: list[float]


def _stats(core: Any) -> EngineStats:
    sched, kv = core.scheduler, core.kv_cache_manager
    queue_times, core.queue_times = core.queue_times, []
    return EngineStats(time.time(), len(sched.running), len(sched.waiting), kv.usage, sched.num_preemptions,
                       kv.prefix_queries, kv.prefix_hits, queue_times)


def _handle(core: Any, msg: tuple, out: Any) -> bool:
    """Apply one front-end message; returns False on shutdown."""
    kind = msg[0]
    if kind == "add":
        for rid, ids, params, eos in msg[1]:
            try:
                core.add_request(rid, ids, params, eos)
            except InvalidRequestError as e:
                out.send(("rejected", rid, str(e), e.param))
    elif kind == "abort":
        core.abort_requests(msg[1])
    elif kind == "shutdown":
        return False
    return True


def run_engine_core(config: EngineConfig, inbox: Any, out: Any, parent_pid: int) -> None:
    """Entry point of the engine process; `config` was resolved (and validated) once, by the front end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when to stop (Ctrl-C reaches both)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s engine %(name)s: %(message)s")
    try:
        from llamaserve.engine.engine_core import EngineCore

        core = EngineCore(config)
        cfg = config
        out.send(("ready", {"num_blocks": core.runner.num_blocks, "block_size": cfg.cache_config.block_size,
                            "vocab_size": core.vocab_size, "max_seq_len": cfg.scheduler_config.max_seq_len,
                            "device": str(cfg.device), "pid": os.getpid()}))
    except BaseException:
        out.send(("dead", traceback.format_exc()))
        return
    try:
        running = True
        while running:
            busy = core.has_unfinished_requests()
            if inbox.poll(0 if busy else HEARTBEAT_S):
                while running and inbox.poll(0):
                    running = _handle(core, inbox.recv(), out)
                if not running:
                    break
            if os.getppid() != parent_pid:
                logger.error("the server process is gone; the engine exits")
                return
            if core.has_unfinished_requests():
                outputs = core.step()
                out.send(("step", outputs, _stats(core)))
            else:
                out.send(("step", [], _stats(core)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.error("the connection to the server process closed; the engine exits")
    except BaseException:
        with contextlib.suppress(OSError):
            out.send(("dead", traceback.format_exc()))
        raise SystemExit(1) from None


class EngineDeadError(RuntimeError):
    """The engine process has stopped; no request can be served."""


class EngineCoreClient:
    """Front-end handle of the engine process: start it, send to it, and read from it on a thread."""

    def __init__(self, config: EngineConfig, on_message: Callable[[tuple], None],
                 startup_timeout_s: float = 1800.0) -> None:
        ctx = mp.get_context("spawn")
        inbox_r, self._inbox_w = ctx.Pipe(duplex=False)
        self._out_r, out_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=run_engine_core, args=(config, inbox_r, out_w, os.getpid()),
                                name="llamaserve-engine", daemon=True)
        self.proc.start()
        inbox_r.close()
        out_w.close()  # so that the engine exiting closes our end: a dead engine is an EOF, never a hang
        self._send_lock = threading.Lock()
        self.info = self._wait_ready(startup_timeout_s)
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read_loop, name="llamaserve-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._out_r.poll(0.2):
                try:
                    msg = self._out_r.recv()
                except EOFError:
                    break
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "dead":
                    self.proc.join(5)
                    raise EngineDeadError(f"the engine failed to start:\n{msg[1]}")
            elif not self.proc.is_alive():
                break
        self.proc.kill()
        raise EngineDeadError(f"the engine process exited or hung during startup (exit code {self.proc.exitcode})")

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._out_r.recv()
            except (EOFError, OSError):
                self.proc.join(2)
                self._on_message(("dead", f"the engine process exited (exit code {self.proc.exitcode})"))
                return
            self._on_message(msg)
            if msg[0] == "dead":
                return

    def send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._inbox_w.send(msg)
        except (OSError, EOFError) as e:
            raise EngineDeadError(f"the engine process is gone: {e}") from None

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(EngineDeadError):
                self.send(("shutdown",))
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
