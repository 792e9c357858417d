"""A table of bad requests: each gets its documented status and OpenAI error body; the server keeps serving."""

from __future__ import annotations

import json

import pytest
import requests

M = "SmolLM2-135M-Instruct"
U = [{"role": "user", "content": "Hi"}]

# (name, method, path, body (dict = JSON, str/bytes = raw), status, param, code)
CASES = [
    ("bad json", "POST", "/v1/completions", '{"prompt": ', 400, None, None),
    ("body is a list", "POST", "/v1/completions", "[1, 2]", 400, None, None),
    ("missing prompt", "POST", "/v1/completions", {"model": M}, 400, "prompt", None),
    ("unknown field", "POST", "/v1/completions", {"prompt": "a", "foo": 1}, 400, "foo", None),
    ("max_tokens wrong type", "POST", "/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("temperature wrong type", "POST", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature",
     None),
    ("seed wrong type", "POST", "/v1/completions", {"prompt": "a", "seed": "abc"}, 400, "seed", None),
    ("prompt mixed list", "POST", "/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", None),
    ("negative temperature", "POST", "/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature", None),
    ("top_p zero", "POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ("top_k negative", "POST", "/v1/completions", {"prompt": "a", "top_k": -5}, 400, "top_k", None),
    ("n zero", "POST", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n", None),
    ("max_tokens zero", "POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ("context overflow by max_tokens", "POST", "/v1/completions", {"prompt": "a", "max_tokens": 100000}, 400,
     "max_tokens", "context_length_exceeded"),
    ("prompt longer than context", "POST", "/v1/completions", {"prompt": [1] * 9000}, 400, "prompt",
     "context_length_exceeded"),
    ("empty prompt", "POST", "/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("empty prompt list", "POST", "/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("token id out of vocab", "POST", "/v1/completions", {"prompt": [999999]}, 400, "prompt", None),
    ("logprobs too many", "POST", "/v1/completions", {"prompt": "a", "logprobs": 50}, 400, "logprobs", None),
    ("unknown model", "POST", "/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("logit_bias", "POST", "/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias", None),
    ("suffix", "POST", "/v1/completions", {"prompt": "a", "suffix": "z"}, 400, "suffix", None),
    ("best_of > n", "POST", "/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of", None),
    ("stream_options without stream", "POST", "/v1/completions",
     {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("empty stop string", "POST", "/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop", None),
    ("presence_penalty out of range", "POST", "/v1/completions", {"prompt": "a", "presence_penalty": 5}, 400,
     "presence_penalty", None),
    ("min_tokens > max_tokens", "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 5}, 400,
     "min_tokens", None),
    ("chat empty messages", "POST", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("chat bad role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("chat image content", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages", None),
    ("chat tools", "POST", "/v1/chat/completions",
     {"messages": U, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    ("chat top_logprobs without logprobs", "POST", "/v1/chat/completions", {"messages": U, "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ("chat json response_format", "POST", "/v1/chat/completions",
     {"messages": U, "response_format": {"type": "json_object"}}, 400, "response_format", None),
    ("chat logprobs wrong type", "POST", "/v1/chat/completions", {"messages": U, "logprobs": 3}, 400, "logprobs",
     None),
    ("chat context overflow", "POST", "/v1/chat/completions", {"messages": U, "max_completion_tokens": 100000}, 400,
     "max_tokens", "context_length_exceeded"),
    ("chat unknown model", "POST", "/v1/chat/completions", {"messages": U, "model": "x"}, 404, "model",
     "model_not_found"),
    ("unknown route", "GET", "/v1/nope", None, 404, None, None),
    ("wrong method", "GET", "/v1/completions", None, 405, None, None),
    ("detokenize out of vocab", "POST", "/detokenize", {"tokens": [10**9]}, 400, "tokens", None),
    ("tokenize needs prompt or messages", "POST", "/tokenize", {}, 400, "prompt", None),
    ("oversized body", "POST", "/v1/completions", b'{"prompt": "' + b"a" * (33 * 2**20) + b'"}', 413, None,
     "request_too_large"),
]


def _good(url: str) -> None:
    r = requests.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
                      timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case):
    name, method, path, body, status, param, code = case
    kw: dict = {"timeout": 60}
    if isinstance(body, dict):
        kw["json"] = body
    elif body is not None:
        kw["data"] = body if isinstance(body, bytes) else body.encode()
        kw["headers"] = {"Content-Type": "application/json"}
    r = requests.request(method, server.url + path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code
    _good(server.url)


def test_table_has_at_least_25_kinds():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def test_error_mid_stream_is_an_sse_error_event_then_done(server):
    """A streaming request that fails validation gets a plain 4xx (nothing was streamed yet)."""
    r = requests.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 100000, "stream": True},
                      timeout=30)
    assert r.status_code == 400 and json.loads(r.text)["error"]["code"] == "context_length_exceeded"


def test_oversized_chunked_body_is_413(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 2**20
        yield b'"}'

    r = requests.post(server.url + "/v1/completions", data=body(), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _good(server.url)
