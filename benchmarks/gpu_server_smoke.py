"""GPU smoke test of `llamaserve serve` (run on the GPU machine): dummy Llama-3.1-8B bf16 behind the HTTP server.

Starts the server, checks /health, a completion, 32 concurrent streams (all must finish with their token
count), an error body, a chat completion (synthetic template), /metrics, then SIGTERM -> exit 0. Writes server.log
and result.json to $OUT (or ./out). Correctness, not speed: the numbers it prints are not benchmarks.

    PYTHONPATH=src python3 benchmarks/gpu_server_smoke.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

OUT = Path(os.environ.get("OUT", "out"))
PORT = 8123
URL = f"http://127.0.0.1:{PORT}"


async def stream(session: aiohttp.ClientSession, prompt: str, max_tokens: int) -> tuple[int, str]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    chunks, usage = 0, None
    async with session.post(URL + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj["choices"]:
                chunks += 1
            if obj.get("usage"):
                usage = obj["usage"]
    return chunks, json.dumps(usage)


def step(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def drive(result: dict) -> None:
    step("completion")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.post(URL + "/v1/completions", json={"prompt": "t1 t2 t3", "max_tokens": 16,
                                                          "temperature": 0}) as r:
            body = await r.json()
            result["completion"] = {"status": r.status, "usage": body["usage"], "text": body["choices"][0]["text"]}
        step("32 concurrent streams")
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(stream(s, f"t{i} t{i + 1} t{i + 2}", 128) for i in range(32)))
        result["concurrent_32x128"] = {"all_complete": all(json.loads(u)["completion_tokens"] == 128 for _, u in outs),
                                       "chunks": [c for c, _ in outs][:4], "wall_s": time.perf_counter() - t0}
        step("errors")
        async with s.post(URL + "/v1/completions", json={"prompt": "t1", "max_tokens": 10**7}) as r:
            result["overflow"] = {"status": r.status, "body": await r.json()}
        async with s.post(URL + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "t5"}],
                                                               "max_tokens": 8}) as r:
            result["chat"] = {"status": r.status, "body": await r.json()}
        step("metrics")
        async with s.get(URL + "/metrics") as r:
            text = await r.text()
            result["metrics"] = [ln for ln in text.splitlines() if ln.startswith("llamaserve:") and "_bucket" not in ln
                                 and "created" not in ln]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "server.log", "w")  # noqa: SIM115
    model = os.environ.get("SMOKE_MODEL", "llama-3.1-8b")
    cmd = [sys.executable, "-m", "llamaserve", "serve", model, "--load-format", "dummy", "--port", str(PORT),
           "--max-num-seqs", "64", "--kv_cache_free_gpu_memory_fraction", "0.5"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"cmd": " ".join(cmd)}
    import urllib.request

    while True:
        try:
            if urllib.request.urlopen(URL + "/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > 400:
            result["error"] = "server did not start"
            break
        time.sleep(0.5)
    result["startup_s"] = time.perf_counter() - t0
    if "error" not in result:
        asyncio.run(drive(result))
        proc.send_signal(signal.SIGTERM)
        result["exit_code"] = proc.wait(120)
    else:
        proc.kill()
    (OUT / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
