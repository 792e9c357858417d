"""Scheduler + KV cache manager on plain lists: hundreds of random requests, aborts and preemptions.

The model is replaced by a plain-Python token source (the scheduler never sees tensors); everything else is the
real EngineCore update path. Invariants are checked after every step.
"""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from llamaserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from llamaserve.engine.engine_core import EngineCore
from llamaserve.engine.scheduler import SchedulerOutput
from llamaserve.errors import InvalidRequestError
from llamaserve.executor.model_runner import RunnerOutput
from llamaserve.sampling_params import SamplingParams

VOCAB = 50


class ListRunner:
    """Stands in for the GPU: 'samples' a token from a seeded RNG for each request that caught up."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self.rng = random.Random(seed)
        self.steps: list[SchedulerOutput] = []

    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        self.steps.append(sched)
        out = RunnerOutput()
        for s in sched.scheduled:
            if s.num_computed_tokens + s.num_new_tokens == s.request.num_tokens:
                out.sampled[s.request.request_id] = self.rng.randrange(VOCAB)
        return out


def make_core(num_blocks: int, block_size: int, max_num_tokens: int, max_batch_size: int, max_seq_len: int,
              prefix_caching: bool, chunked: bool = True, seed: int = 0, overlap: bool = False) -> EngineCore:
    mc = ModelConfig("list", None, "dummy", SimpleNamespace(vocab_size=VOCAB), torch.float32, max_seq_len, 0)
    cfg = EngineConfig(mc, CacheConfig(block_size, torch.float32, 0.9, prefix_caching),
                       SchedulerConfig(max_batch_size, max_num_tokens, max_seq_len, chunked), ParallelConfig(),
                       torch.device("cpu"), "torch", overlap_scheduling=overlap)
    return EngineCore(cfg, runner=ListRunner(num_blocks, seed))


def check_invariants(core: EngineCore, sched: SchedulerOutput) -> None:
    kv, sc = core.kv_cache_manager, core.scheduler
    assert sched.num_scheduled_tokens <= sc.config.max_num_tokens
    assert len(sc.running) <= sc.config.max_batch_size
    owners = Counter()
    for rid, blocks in kv.req_blocks.items():
        ids = [b.block_id for b in blocks]
        assert len(ids) == len(set(ids)), f"{rid} holds a block twice"
        owners.update(ids)
    for b in kv.pool.blocks:
        assert b.ref_cnt == owners[b.block_id], f"block {b.block_id}: ref {b.ref_cnt} != owners"
        assert (b.ref_cnt == 0) == (b.block_id in kv.pool.free_queue)
    for h, b in kv.pool.cached.items():
        assert b.block_hash == h
    for req in sc.running:
        assert len(kv.req_blocks[req.request_id]) * kv.block_size >= req.num_computed_tokens
    assert set(kv.req_blocks) <= set(sc.requests)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_invariants(prefix_caching, seed, overlap):
    """Random arrivals, lengths, EOS and aborts; with overlap scheduling, results arrive one step late and
    placeholders stand for tokens in flight. Every request ends, no block leaks, outputs respect the limits."""
    rng = random.Random(seed)
    core = make_core(num_blocks=40, block_size=4, max_num_tokens=32, max_batch_size=8, max_seq_len=120,
                     prefix_caching=prefix_caching, seed=seed, overlap=overlap)
    emitted: dict[str, list[int]] = {}
    limits: dict[str, SamplingParams] = {}
    shared = [rng.randrange(VOCAB) for _ in range(20)]  # common prefixes make cache hits happen
    added, steps, aborted = {}, 0, set()
    finished: dict[str, str] = {}
    for i in range(300):
        plen = rng.randint(1, 60)
        prompt = (shared[: rng.randint(0, 20)] + [rng.randrange(VOCAB) for _ in range(plen)])[:100]
        params = SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.5)
        core.add_request(str(i), prompt, params, eos_token_ids={0})
        added[str(i)] = steps
        limits[str(i)] = params
        for _ in range(rng.randint(0, 2)):
            for out in core.step():
                emitted.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    finished[out.request_id] = out.finish_reason
            steps += 1
            if core.runner.steps:
                check_invariants(core, core.runner.steps[-1])
        if rng.random() < 0.1:
            victim = rng.choice(list(core.scheduler.requests) or ["none"])
            core.abort_requests([victim])
            aborted.add(victim)
    while core.has_unfinished_requests():
        for out in core.step():
            emitted.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        check_invariants(core, core.runner.steps[-1])
        steps += 1
        assert steps < 10_000, "requests starved"
    assert set(finished) | aborted >= set(added)
    assert core.pending is None
    for rid, reason in finished.items():
        toks, params = emitted[rid], limits[rid]
        assert -1 not in toks and 0 < len(toks) <= params.max_tokens
        if reason == "length":
            assert len(toks) == params.max_tokens
        else:
            assert reason == "stop" and toks[-1] == 0 and 0 not in toks[:-1] and not params.ignore_eos
    assert core.kv_cache_manager.num_free_blocks == 40, "blocks leaked"
    assert not core.kv_cache_manager.req_blocks
    assert core.scheduler.num_preemptions > 0, "the workload should have preempted"
    if prefix_caching:
        assert core.kv_cache_manager.prefix_hits > 0


def test_every_step_respects_budget_and_chunks_long_prompts():
    core = make_core(num_blocks=100, block_size=4, max_num_tokens=16, max_batch_size=4, max_seq_len=200,
                     prefix_caching=False)
    core.add_request("long", list(range(1, 50)), SamplingParams(max_tokens=3, ignore_eos=True))
    core.add_request("short", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    while core.has_unfinished_requests():
        core.step()
    steps = core.runner.steps
    assert all(s.num_scheduled_tokens <= 16 for s in steps)
    assert [s.num_new_tokens for s in steps[0].scheduled] == [16]  # the long prompt is chunked
    assert len(steps) >= 49 // 16  # several steps per prompt
    # decodes of running requests go first in every step
    for s in steps:
        kinds = [sr.num_new_tokens == 1 and sr.num_computed_tokens >= sr.request.num_prompt_tokens
                 for sr in s.scheduled]
        assert kinds == sorted(kinds, reverse=True) or not any(kinds)


def test_preempts_newest_and_oldest_progresses():
    core = make_core(num_blocks=6, block_size=4, max_num_tokens=64, max_batch_size=8, max_seq_len=24,
                     prefix_caching=False)
    for i in range(3):
        core.add_request(f"r{i}", [1 + i] * 7, SamplingParams(max_tokens=10, ignore_eos=True))
    order = []
    while core.has_unfinished_requests():
        order += [o.request_id for o in core.step() if o.finished]
    assert order[0] == "r0"
    assert core.scheduler.num_preemptions > 0
    assert core.kv_cache_manager.num_free_blocks == 6


def test_admission_rejects_what_can_never_run():
    core = make_core(num_blocks=4, block_size=4, max_num_tokens=16, max_batch_size=4, max_seq_len=32,
                     prefix_caching=True)
    with pytest.raises(InvalidRequestError, match="maximum context length") as e:
        core.add_request("a", [1] * 32, SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        core.add_request("b", [1] * 10, SamplingParams(max_tokens=30))
    with pytest.raises(InvalidRequestError, match="whole cache holds 16"):
        core.add_request("c", [1] * 10, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="empty"):
        core.add_request("d", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"\[0, 50\)"):
        core.add_request("e", [VOCAB], SamplingParams())
    core.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="already in use"):
        core.add_request("ok", [1], SamplingParams())
    while core.has_unfinished_requests():
        core.step()
    assert core.kv_cache_manager.num_free_blocks == 4
