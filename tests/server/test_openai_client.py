"""End to end with the official `openai` client against a real server on the bundled SmolLM2 (CPU)."""

from __future__ import annotations

import asyncio
import math

import pytest

from llamaserve.sampling_params import SamplingParams

PROMPT = "The three primary colors are"


def test_models_and_version(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    import requests

    assert requests.get(server.url + "/version", timeout=10).json()["version"]


def test_greedy_completion_equals_offline_llm(client, llm):
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0)
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    choice = resp.choices[0]
    assert choice.text == ref.text and choice.text.strip()
    assert choice.finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_prompt_forms_batch_and_token_ids(client, llm):
    prompts = ["Once upon a time", "def fibonacci(n):"]
    ids = llm.tokenizer.encode(prompts[1])
    refs = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0))]
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == refs
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=10, temperature=0)
    assert resp.choices[0].text == refs[1]
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=[ids, ids[:3]], max_tokens=4,
                                     temperature=0)
    assert len(resp.choices) == 2 and resp.choices[0].text.startswith(refs[1][:4])


def test_greedy_chat_equals_offline_llm(client, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=20,
                                          temperature=0)
    ref = llm.chat(messages, SamplingParams(max_tokens=20, temperature=0)).outputs[0]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.prompt_tokens == len(llm.apply_chat_template(messages))
    resp2 = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                           max_completion_tokens=20, temperature=0)
    assert resp2.choices[0].message.content == ref.text


def test_streaming_is_per_token_and_matches(client):
    kw = dict(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == full
    assert len(texts) >= 10, "tokens should arrive one chunk at a time"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_matches(client):
    kw = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Count to five."}],
              max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)


def test_n_and_seed(client):
    kw = dict(model="SmolLM2-135M-Instruct", prompt="My favourite animal is", max_tokens=12, temperature=1.0,
              n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "the n samples should differ"
    assert 3 <= a.usage.completion_tokens <= 36
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in sorted(c.choices, key=lambda c: c.index)] != texts
    streamed = list(client.completions.create(stream=True, **kw))
    joined = {i: "".join(ch.choices[0].text for ch in streamed if ch.choices and ch.choices[0].index == i)
              for i in range(3)}
    assert [joined[i] for i in range(3)] == texts


def test_stop_strings_and_token_ids(client, llm):
    full = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24,
                                     temperature=0).choices[0].text
    word = full.split()[2]
    cut = full[: full.index(word)]
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0,
                                     stop=[word])
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0, stop=word, stream=True))
    assert streamed == cut
    first_id = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids[1]
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"stop_token_ids": [first_id]})
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 2


def test_vllm_extra_sampling_fields(client):
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=8, temperature=0.8,
                                     seed=3, presence_penalty=0.5, frequency_penalty=0.5,
                                     extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                                 "min_tokens": 8, "ignore_eos": True})
    assert resp.usage.completion_tokens == 8 and resp.choices[0].finish_reason == "length"


def test_completion_logprobs_match_engine(client, llm):
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=3)
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0].outputs[0]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for tid, entry, got, top in zip(ref.token_ids, ref.logprobs, lp.token_logprobs, lp.top_logprobs):
        assert math.isclose(got, entry[tid].logprob, abs_tol=1e-4)
        assert 3 <= len(top) <= 4 and math.isclose(max(top.values()), got, abs_tol=1e-4)  # greedy: chosen is top
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_echo_with_prompt_logprobs_for_lm_eval(client, llm):
    ids = llm.tokenizer.encode(PROMPT)
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=1, temperature=0,
                                     logprobs=1, echo=True)
    ref = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1))[0]
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text.startswith(PROMPT)
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i, tid in enumerate(ids[1:], start=1):
        assert math.isclose(lp.token_logprobs[i], ref.prompt_logprobs[i][tid].logprob, abs_tol=1e-4)
        assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-5)  # greedy
        assert bytes(item.bytes).decode() == item.token
    assert "".join(i.token for i in content) == resp.choices[0].message.content


def test_tokenize_detokenize_and_tokenizer_info(server, llm):
    import requests

    r = requests.post(server.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}, timeout=10)
    assert r.status_code == 200 and r.json()["tokens"] == llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert r.json()["count"] == len(r.json()["tokens"])
    r2 = requests.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]}, timeout=10)
    assert r2.json()["prompt"] == PROMPT
    chat = requests.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=10)
    assert chat.json()["tokens"] == llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    info = requests.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == llm.tokenizer.eos_token and "{%" in info["chat_template"]


def test_openapi_docs(server):
    import requests

    assert requests.get(server.url + "/docs", timeout=10).status_code == 200
    paths = requests.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/health", "/metrics"} <= set(paths)


@pytest.mark.parametrize("n_clients", [64])
def test_many_concurrent_streaming_clients(server, llm, n_clients):
    from openai import AsyncOpenAI

    prompts = [f"Fact number {i}: the" for i in range(n_clients)]
    refs = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]

    async def one(c: AsyncOpenAI, p: str) -> str:
        stream = await c.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=12, temperature=0,
                                            stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def main() -> list[str]:
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(main()) == refs
