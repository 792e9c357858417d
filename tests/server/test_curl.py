"""The server driven with curl, as the deployment guides do."""

from __future__ import annotations

import json
import subprocess


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)


def test_health_and_models(server):
    out = curl("-o", "/dev/null", "-w", "%{http_code}", server.url + "/health")
    assert out.stdout == "200"
    assert json.loads(curl(server.url + "/v1/models").stdout)["data"][0]["id"] == "SmolLM2-135M-Instruct"


def test_completion_and_chat(server, llm):
    from llamaserve.sampling_params import SamplingParams

    body = {"model": "SmolLM2-135M-Instruct", "prompt": "San Francisco is a", "max_tokens": 12, "temperature": 0}
    out = curl(server.url + "/v1/completions", "-H", "Content-Type: application/json", "-d", json.dumps(body))
    ref = llm.generate("San Francisco is a", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert json.loads(out.stdout)["choices"][0]["text"] == ref
    chat = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
    out = curl(server.url + "/v1/chat/completions", "-H", "Content-Type: application/json", "-d", json.dumps(chat))
    resp = json.loads(out.stdout)
    assert resp["object"] == "chat.completion" and resp["usage"]["completion_tokens"] <= 8


def test_streaming_sse(server):
    body = {"prompt": "One, two, three,", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out = curl("-N", server.url + "/v1/completions", "-H", "Content-Type: application/json", "-d", json.dumps(body))
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 10 and chunks[-1]["choices"] == []
    assert len([c for c in chunks if c["choices"]]) >= 8


def test_error_body(server):
    out = curl("-w", "\n%{http_code}", server.url + "/v1/completions", "-H", "Content-Type: application/json",
               "-d", '{"prompt": "x", "max_tokens": -1}')
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "400" and json.loads(body)["error"]["param"] == "max_tokens"
