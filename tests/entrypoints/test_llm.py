"""The offline LLM API on the bundled SmolLM2: sampling behaviours, logprobs, stop conditions, bad input."""

from __future__ import annotations

import pytest
import torch

from llamaserve import LLM, InvalidRequestError, SamplingParams
from tests.conftest import LONG_TEXT

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), max_seq_len=1024, num_kv_blocks=256)


def test_seeded_sampling_is_independent_of_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16)
    alone = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    crowd = llm.generate([LONG_TEXT, "Once upon a time", "Hello", "Once upon a time"],
                         [SamplingParams(temperature=1.0, max_tokens=20), p, GREEDY,
                          SamplingParams(temperature=1.0, seed=99, max_tokens=16)])
    assert crowd[1].outputs[0].token_ids == alone
    assert crowd[3].outputs[0].token_ids != alone  # another seed, another sample


def test_n_samples(llm):
    out = llm.generate("Write a word:", SamplingParams(n=3, temperature=1.2, seed=7, max_tokens=8))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.runner.num_blocks


def test_stop_string_split_across_tokens(llm):
    base = llm.generate("The capital of France is", GREEDY)[0].outputs[0]
    toks = base.token_ids
    # a stop string made of the end of token 3 and the start of token 4: no single token holds it
    t3, t4 = llm.tokenizer.decode(toks[3:4]), llm.tokenizer.decode(toks[4:5])
    assert t3 and t4
    stop = t3[-1] + t4[:1]
    full = base.text
    cut = full.find(stop)
    assert cut >= 0
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    c = out[0].outputs[0]
    assert c.text == full[:cut] and c.finish_reason == "stop" and c.stop_reason == stop
    inc = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=stop,
                                                                  include_stop_str_in_output=True))
    assert inc[0].outputs[0].text == full[: cut + len(stop)]


def test_stop_token_ids_max_tokens_min_tokens_ignore_eos(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] in llm.eos_token_ids
    n = len(free.token_ids)
    longer = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 3))[0].outputs[0]
    assert len(longer.token_ids) >= n + 3
    assert not set(longer.token_ids[: n + 2]) & llm.eos_token_ids
    ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True))[0].outputs[0]
    assert len(ignored.token_ids) == n + 5 and ignored.finish_reason == "length"
    stop_id = free.token_ids[1]
    by_id = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[stop_id]))
    c = by_id[0].outputs[0]
    assert c.token_ids == free.token_ids[:2] and c.finish_reason == "stop" and c.stop_reason == stop_id
    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0]
    assert len(short.token_ids) == 1 and short.finish_reason == "length"


def test_logprobs_and_prompt_logprobs_match_transformers(llm, hf_smollm2):
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                             prompt_logprobs=2))[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-4
        assert len(entry) >= 2 and min(lp.rank for lp in entry.values()) == 1
    c = out.outputs[0]
    total = 0.0
    for k, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        pos = len(out.prompt_token_ids) + k - 1
        assert entry[tok].rank == 1 and abs(entry[tok].logprob - ref[pos, tok].item()) < 1e-4
        assert len(entry) == 3 and entry[tok].decoded_token == llm.tokenizer.decode([tok])
        total += entry[tok].logprob
    assert abs(c.cumulative_logprob - total) < 1e-6


@pytest.mark.parametrize("bad", [
    dict(max_tokens=-1), dict(max_tokens=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1),
    dict(top_k=-2), dict(min_p=2.0), dict(n=0), dict(presence_penalty=3.0), dict(repetition_penalty=0.0),
    dict(logprobs=21), dict(min_tokens=5, max_tokens=2), dict(stop=[""]),
])
def test_bad_sampling_params_name_the_parameter(bad):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**bad)
    assert e.value.param == next(iter(bad)) or e.value.param in bad


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    too_long = LONG_TEXT * 20  # > 1024 tokens
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        llm.generate(["Hello", too_long], GREEDY)  # nothing of this call is queued
    assert not llm.engine.has_unfinished_requests()
    # an error while other requests are in flight leaves them running
    rid = llm.add_request("The capital of France is", GREEDY)
    with pytest.raises(InvalidRequestError):
        llm.add_request(too_long, GREEDY)
    done = {}
    while llm.engine.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert done[rid].outputs[0].text.strip().startswith("Paris")
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.runner.num_blocks


def test_stream_yields_the_same_text(llm):
    full = llm.generate("Hello, my name is", GREEDY)[0].outputs[0].text
    pieces = list(llm.stream("Hello, my name is", GREEDY))
    assert len(pieces) > 3 and "".join(pieces) == full
