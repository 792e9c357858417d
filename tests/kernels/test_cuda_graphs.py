"""CUDA graphs for decode: size selection (anywhere), and graph replay equal to eager execution (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from llamaserve.executor.cuda_graphs import CudaGraphRunner, default_sizes


def test_default_sizes():
    assert default_sizes(1) == [1]
    assert default_sizes(6) == [1, 2, 4, 6]
    assert default_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert default_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_size_selection_with_and_without_padding():
    r = CudaGraphRunner.__new__(CudaGraphRunner)
    r.sizes, r.graphs = [1, 2, 4, 8], dict.fromkeys([1, 2, 4, 8])
    r.padding = True
    assert [r.size_for(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]
    r.padding = False
    assert [r.size_for(n) for n in (1, 3, 4, 9)] == [1, None, 4, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_graph_replay_matches_eager(tiny_llama_dir):
    from llamaserve.entrypoints.llm import LLM
    from llamaserve.sampling_params import SamplingParams

    prompts = [[5, 9, 3], list(range(1, 60)), [7] * 20, [11, 12], [3] * 33]  # 5 requests: padded to 8
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_llama_dir), dtype="float32", kernel_backend="triton", num_kv_blocks=64,
                  enforce_eager=eager, cuda_graph_batch_sizes=[1, 2, 4, 8])
        assert (llm.engine.runner.graphs is None) == eager
        outs[eager] = llm.generate(prompts, params)
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for ea, eb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(ea[t].logprob - eb[t].logprob) < 1e-3
