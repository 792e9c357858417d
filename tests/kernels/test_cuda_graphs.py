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


class _Echo(torch.nn.Module):
    """A model that returns what it was given: [ids, positions, slots, seq_lens, first block] per row."""

    def attention_layers(self) -> list:
        return []

    def forward(self, ids, positions, batch):
        return torch.stack([ids, positions, batch.slot_mapping, batch.seq_lens, batch.block_tables[:, 0]], 1)


class _Replay:
    """Stands in for a captured graph on the CPU: replay() runs the captured function again."""

    def __init__(self, runner, bs):
        self.runner, self.bs = runner, bs

    def replay(self):
        self.runner.outputs[self.bs].copy_(self.runner._forward(self.bs, self.runner.batches[self.bs]))


def test_step_inputs_in_one_buffer_and_placeholders_from_sampled():
    """`run` lays a step's inputs out in the size's views of the one input buffer (padding rows: scratch slot,
    empty context, token 0), and a placeholder token takes the previous step's sampled id from `sampled`."""
    r = CudaGraphRunner(_Echo(), [1, 4], True, 16, 3, 999, torch.device("cpu"), max_sampled=6)
    assert r.sampled.numel() == 6 and r.inputs.numel() == 4 * (5 + 3)
    for bs in (1, 4):
        r.batches[bs] = r._batch(bs)
        r.outputs[bs] = r._forward(bs, r.batches[bs])
        r.graphs[bs] = _Replay(r, bs)
    r.sampled[:3] = torch.tensor([70, 71, 72])
    tables = torch.tensor([[4, 5], [6, 0], [8, 9]]).numpy()
    got = r.run(4, [11, -1, -1], [3, 17, 40], [51, 97, 130], tables, [4, 18, 41], {1: 2, 2: 0})
    assert got.tolist() == [[11, 3, 51, 4, 4], [72, 17, 97, 18, 6], [70, 40, 130, 41, 8]]
    assert r.outputs[4][3].tolist() == [0, 0, 999, 0, 0]  # the padding row
    got = r.run(1, [-1], [5], [77], tables[:1], [6], {0: 1})
    assert got.tolist() == [[71, 5, 77, 6, 4]]


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
