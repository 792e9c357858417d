"""A tiny OpenAI-compatible server that streams tokens at scripted times (aiohttp.web, in a thread).

The prompt of a custom-dataset line chooses the behaviour: "ttft=<s> itl=<s> n=<tokens>" streams n one-word tokens
after ttft seconds, then one every itl seconds; "fail500" answers HTTP 500; "drop" sends two tokens and drops the
connection; "slow" waits 4 s. `usage=False` on the server omits usage (the client must re-tokenize).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

from aiohttp import web


class ScriptedServer:
    def __init__(self, usage: bool = True) -> None:
        self.usage = usage
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body.get("prompt") or body["messages"][0]["content"]
        if prompt.startswith("fail500"):
            return web.json_response({"error": {"message": "scripted failure"}}, status=500)
        chat = "messages" in body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def token(text: str) -> None:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())

        if prompt.startswith("drop"):
            await token(" a")
            await token(" b")
            request.transport.close()
            return resp
        if prompt.startswith("slow"):
            await asyncio.sleep(4)
        spec = dict(kv.split("=") for kv in prompt.split())
        ttft, itl, n = float(spec["ttft"]), float(spec["itl"]), int(spec["n"])
        await asyncio.sleep(ttft)
        for i in range(n):
            if i:
                await asyncio.sleep(itl)
            await token(f" t{i + 1}")
        if self.usage:
            u = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': u})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
