"""Greedy tokens and logits agree with Hugging Face transformers in float32, through every scheduling path."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamaserve import LLM, SamplingParams
from llamaserve.layers.attention import ForwardBatch
from tests.conftest import LONG_TEXT


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prompt, run through the engine's model and paged cache."""
    runner = llm.engine.runner
    bs = runner.block_size
    n = len(ids)
    nb = -(-n // bs)
    assert nb <= runner.num_blocks
    dev = runner.device
    pos = torch.arange(n, device=dev)
    batch = ForwardBatch(pos, pos.clone(), torch.arange(nb, device=dev)[None], torch.tensor([n], device=dev),
                         torch.tensor([0, n], device=dev), [n], [n], bs)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(torch.tensor(ids, device=dev), pos, batch))


@pytest.mark.parametrize("overlap", [False, True])
def test_smollm2_greedy_parity_chunked_and_preempted(smollm2_dir, hf_smollm2, overlap):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["Hi", "The capital of France is", "def quicksort(arr):\n", LONG_TEXT * 2, LONG_TEXT * 6,
             LONG_TEXT * 25]
    prompts = [tok.encode(t) for t in texts]
    prompts[0] = prompts[0][:1]  # a 1-token prompt
    lengths = [len(p) for p in prompts]
    assert lengths[0] == 1 and lengths[-1] > 1500, lengths
    # room for every prompt but not for their outputs: decodes must preempt the newest request
    num_blocks = sum(-(-n // 16) for n in lengths) + 1
    llm = LLM(str(smollm2_dir), max_seq_len=2048, max_num_tokens=256, num_kv_blocks=num_blocks, block_size=16,
              enable_prefix_caching=False, overlap_scheduling=overlap)
    params = SamplingParams(temperature=0, max_tokens=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.engine.scheduler.num_preemptions > 0, "the tiny cache should have forced a preemption"
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_smollm2, p, 12), f"prompt of {len(p)} tokens"
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.runner.num_blocks


def test_smollm2_prefill_logits(smollm2_dir, hf_smollm2):
    llm = LLM(str(smollm2_dir), max_seq_len=1024, num_kv_blocks=64)
    ids = llm.tokenizer.encode(LONG_TEXT * 3)
    ours = prefill_logits(llm, ids)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, rel


def test_tiny_llama3_untied_parity(tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    llm = LLM(str(tiny_llama_dir), max_num_tokens=64, num_kv_blocks=48, block_size=8)
    gen = torch.Generator().manual_seed(1)
    # positions beyond original_max_position_embeddings=256 exercise every llama3 frequency band
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 5, 40, 300)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                              pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref, f"prompt of {len(p)} tokens"
    ids = prompts[-1]
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0]
    rel = (prefill_logits(llm, ids) - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_cache_hits_give_same_tokens(smollm2_dir, prefix_caching):
    llm = LLM(str(smollm2_dir), max_seq_len=1024, num_kv_blocks=200, enable_prefix_caching=prefix_caching)
    shared = LONG_TEXT * 2
    prompts = [shared + " Question one:", shared + " Question two:"]
    params = SamplingParams(temperature=0, max_tokens=8)
    first = llm.generate(prompts, params)
    again = llm.generate(prompts, params)  # second time the shared prefix is in the cache
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    cached = again[0].num_cached_tokens
    assert (cached > 0) == prefix_caching, cached



def test_seeded_sampling_survives_preemption(tiny_llama_dir):
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (40,), generator=gen).tolist() for _ in range(4)]
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=30, ignore_eos=True) for i in range(4)]
    roomy = LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=8, max_seq_len=256)
    tight = LLM(str(tiny_llama_dir), num_kv_blocks=20, block_size=8, max_seq_len=256)
    a = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert roomy.engine.scheduler.num_preemptions == 0 < tight.engine.scheduler.num_preemptions
    assert a == b


def test_overlap_scheduling_changes_no_output(tiny_llama_dir):
    """Overlap scheduling (results one step late, placeholders for tokens in flight) gives exactly the outputs of
    the plain loop: greedy and seeded sampling, EOS / stop-token / length ends, min_tokens, logprobs, prompt
    logprobs, penalties (which take the pending step first), prefix-cache hits and preemption."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 17, 40, 64, 9, 33)]
    prompts.append(prompts[2][:32] + [7, 8, 9])  # shares two blocks with prompt 2
    greedy = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 1, 20)]
    probe = LLM(str(tiny_llama_dir), num_kv_blocks=24, block_size=8, max_seq_len=256)
    free_run = [o.outputs[0].token_ids for o in probe.generate(prompts[:3], greedy)]
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free_run[0][4]]),  # stops at its 5th token
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=1.0, seed=7, max_tokens=25, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=18, min_tokens=10),
        SamplingParams(temperature=0, max_tokens=10, prompt_logprobs=1, logprobs=0),
        SamplingParams(temperature=0.7, seed=11, max_tokens=15, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=14, repetition_penalty=1.3),
    ]
    eos = {free_run[2][6]}  # a token the greedy run of prompt 2 emits: it ends there unless ignored

    def run(overlap: bool):
        llm = LLM(str(tiny_llama_dir), num_kv_blocks=24, block_size=8, max_seq_len=256, max_num_tokens=48,
                  overlap_scheduling=overlap)
        llm.eos_token_ids = eos
        outs = []
        for p, sp in zip(prompts, params):
            llm.add_request(p, sp)
        while llm.engine.has_unfinished_requests():
            outs.extend(o for o in llm.step() if o.finished)
        return llm, {o.request_id: o for o in outs}

    plain_llm, plain = run(False)
    overlap_llm, overlapped = run(True)
    assert overlap_llm.engine.overlap and not plain_llm.engine.overlap
    assert overlap_llm.engine.scheduler.num_preemptions > 0, "the small cache should preempt"
    assert len(plain) == len(prompts) and set(overlapped) == set(plain)

    def flat(lps):  # [(position, token, rank, logprob)]: ranks and ids exact, values to float tolerance
        return [(i, tok, lp.rank, lp.logprob) for i, d in enumerate(lps or []) if d for tok, lp in sorted(d.items())]

    for rid, a in plain.items():
        b = overlapped[rid]
        assert (b.outputs[0].token_ids, b.outputs[0].finish_reason) == (a.outputs[0].token_ids,
                                                                        a.outputs[0].finish_reason), rid
        for la, lb in [(flat(a.outputs[0].logprobs), flat(b.outputs[0].logprobs)),
                       (flat(a.prompt_logprobs), flat(b.prompt_logprobs))]:
            assert [x[:3] for x in la] == [x[:3] for x in lb], rid
            assert all(abs(x[3] - y[3]) < 1e-4 for x, y in zip(la, lb)), rid
    assert plain["4"].prompt_logprobs and plain["2"].outputs[0].logprobs
    reasons = [v.outputs[0].finish_reason for v in plain.values()]
    assert "stop" in reasons and "length" in reasons


@pytest.mark.parametrize("overlap", [False, True])
def test_warmup_runs_dummy_requests_and_leaves_nothing_behind(tiny_llama_dir, overlap, caplog):
    """warmup=True (the default with CUDA) steps a few dummy requests through the engine at start-up: afterwards
    no request, KV block, queue time or prefix-cache count is left from them, and real requests get the tokens of
    an engine without the warm-up (greedy and seeded sampling)."""
    caplog.set_level(logging.INFO, "llamaserve.engine.engine_core")
    kw = dict(num_kv_blocks=64, block_size=8, max_seq_len=256, max_num_tokens=96, overlap_scheduling=overlap)
    warm = LLM(str(tiny_llama_dir), warmup=True, **kw)
    assert "warm-up: 5 dummy requests" in caplog.text
    eng = warm.engine
    assert eng.config.warmup and not eng.has_unfinished_requests() and not eng.scheduler.requests
    assert eng.kv_cache_manager.num_free_blocks == eng.kv_cache_manager.num_blocks
    assert not eng.queue_times and eng.kv_cache_manager.prefix_queries == 0 == eng.scheduler.num_preemptions
    cold = LLM(str(tiny_llama_dir), **kw)
    assert not cold.engine.config.warmup  # off by default without CUDA
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 30, 61)]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=10, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    a = [o.outputs[0].token_ids for o in warm.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in cold.generate(prompts, params)]
    assert a == b
