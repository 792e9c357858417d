"""RoPE frequencies against transformers; sampler filters, penalties and seeds against hand-computed values."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llamaserve.layers.rotary import inv_frequencies, rope_parameters
from llamaserve.layers.sampler import Sampler, SamplingMetadata, row_seed
from llamaserve.sampling_params import SamplingParams


def test_llama3_inv_freq_matches_transformers():
    cfg = LlamaConfig(head_dim=128, hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})
    theta, scaling = rope_parameters(cfg)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.equal(inv_frequencies(128, theta, scaling), ref)


def md(params, outputs=None, prompts=None, seeds=None):
    n = len(params)
    return SamplingMetadata(params, seeds or list(range(n)), outputs or [[] for _ in range(n)],
                            prompts or [[0] for _ in range(n)], [[] for _ in range(n)])


def test_filters_reduce_to_greedy_when_they_keep_one_token():
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler()
    logits = torch.randn(4, 100, generator=gen)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
              SamplingParams(temperature=0)]
    for it in range(5):
        assert torch.equal(sampler(logits.clone(), md(params, seeds=[it] * 4)).sampled, logits.argmax(-1))


def test_top_k_top_p_keep_only_allowed_tokens():
    sampler = Sampler()
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7)]  # top_p: 0.5 + 0.3 covers 0.7
    seen = [set(), set()]
    for it in range(200):
        out = sampler(logits.clone(), md(params, seeds=[2 * it, 2 * it + 1])).sampled.tolist()
        seen[0].add(out[0])
        seen[1].add(out[1])
    assert seen == [{0, 1}, {0, 1}]


def test_penalties():
    sampler = Sampler()
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.05]])
    # repetition: token 0 (seen in prompt) 2.0 / 2 = 1.0 < 1.9 -> token 1
    assert sampler(logits.clone(), md([SamplingParams(temperature=0, repetition_penalty=2.0)],
                                      prompts=[[0]])).sampled.item() == 1
    # frequency 1.0, outputs [1, 1, 0]: token 0 -> 2.0 - 1 = 1.0, token 1 -> 1.9 - 2 = -0.1
    out = sampler(logits.clone(), md([SamplingParams(temperature=0, frequency_penalty=1.0)], outputs=[[1, 1, 0]]))
    assert out.sampled.item() == 0
    # presence 2 on tokens 0 and 1: 2.0 -> 0.0, 1.9 -> -0.1; token 3 (0.05) wins
    out = sampler(logits.clone(), md([SamplingParams(temperature=0, presence_penalty=2.0)], outputs=[[0, 1]]))
    assert out.sampled.item() == 3


def test_seeded_rows_ignore_their_neighbours():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0, seed=5)
    a = [Sampler()(logits.clone(), md([p], seeds=[row_seed(5, 7)])).sampled.item() for _ in range(3)]
    crowd = torch.cat([torch.randn(3, 1000), logits])
    b = Sampler()(crowd, md([SamplingParams()] * 3 + [p], seeds=[11, 12, 13, row_seed(5, 7)]))
    assert len(set(a)) == 1 and b.sampled[3].item() == a[0]
    other = {Sampler()(logits.clone(), md([p], seeds=[row_seed(5, i)])).sampled.item() for i in range(8)}
    assert len(other) > 1  # the next draws of the stream differ


def test_logprobs_rank_and_top():
    sampler = Sampler()
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    out = sampler(logits.clone(), md([SamplingParams(temperature=0, logprobs=2)]))
    ref = logits.log_softmax(-1)[0]
    assert out.sampled.item() == 1 and out.ranks.item() == 1
    assert torch.allclose(out.top_logprobs[0], ref[[1, 2]]) and out.top_ids[0].tolist() == [1, 2]
