"""ModelRunner: loads the model, owns the KV cache tensors, and executes one scheduled step.

From a `SchedulerOutput` it builds the flattened step (`input_ids`, `positions`, `ForwardBatch`), runs the model,
computes logits only for rows that need them (the last token of each request that samples, and prompt
positions whose logprobs were asked for), samples, and returns plain Python results for the scheduler.
KV cache size: `num_kv_blocks` if set; on CUDA, `kv_cache_free_gpu_memory_fraction` of the memory left after
the weights and a profiled activation peak; on CPU that fraction of available RAM, capped at `cpu_kv_cache_gib`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.scheduler import SchedulerOutput
from llamaserve.layers.attention import ForwardBatch
from llamaserve.layers.quantization import calibrate_input_scales
from llamaserve.layers.sampler import Sampler, SamplingMetadata
from llamaserve.loader import get_model
from llamaserve.models.llama import head_dim_of
from llamaserve.outputs import Logprob, TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        mc, cc = config.model_config, config.cache_config
        self.block_size = cc.block_size
        torch.manual_seed(mc.seed)
        self.model = get_model(mc, self.device, config.kernel_backend)
        cfg = mc.hf_config
        self.attn_layers = self.model.attention_layers()
        self.num_kv_heads = self.attn_layers[0].num_kv_heads
        self.head_dim = head_dim_of(cfg)
        qc = mc.quant_config
        if mc.load_format == "dummy" and qc is not None and qc.static_input_scales:
            n = min(512, config.scheduler_config.max_num_tokens, mc.max_seq_len)
            ids = torch.randint(0, int(cfg.vocab_size), (n,), generator=torch.Generator().manual_seed(mc.seed))
            count = calibrate_input_scales(self.model, lambda: self._dummy_run(n, ids.to(self.device)))
            logger.info("FP8: calibrated the static input scales of %d layers on %d random tokens", count, n)
        self.num_blocks = cc.num_kv_blocks or self._profile_num_blocks()
        if self.num_blocks < 1:
            raise ValueError("no memory is left for the KV cache; raise kv_cache_free_gpu_memory_fraction or "
                             "use a smaller model")
        # one scratch block past the pool's blocks: padded CUDA-graph rows write their K/V there
        scratch = 1 if config.cuda_graph_sizes else 0
        shape = (2, (self.num_blocks + scratch) * self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=cc.kv_cache_dtype, device=self.device)
                          for _ in self.attn_layers]
        for layer, cache in zip(self.attn_layers, self.kv_caches):
            layer.kv_cache = cache
        self.graphs = None
        if config.cuda_graph_sizes:
            from llamaserve.executor.cuda_graphs import CudaGraphRunner

            max_blocks = -(-config.scheduler_config.max_seq_len // self.block_size)
            self.graphs = CudaGraphRunner(self.model, config.cuda_graph_sizes, config.cuda_graph_padding,
                                          self.block_size, max_blocks, self.num_blocks * self.block_size,
                                          self.device)
            self.graphs.capture()
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(mc.seed))
        self.generators: dict[str, torch.Generator] = {}
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s)", self.num_blocks,
                    self.block_size, self.num_blocks * self.block_size,
                    self.num_blocks * self.block_bytes / 2**30, cc.kv_cache_dtype)

    @property
    def block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.config.cache_config.kv_cache_dtype).element_size()
        return 2 * len(self.attn_layers) * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def _profile_num_blocks(self) -> int:
        cc = self.config.cache_config
        if self.device.type != "cuda":
            frac = cc.gpu_memory_utilization or cc.kv_cache_free_gpu_memory_fraction
            budget = min(_available_cpu_bytes() * frac,
                         cc.cpu_kv_cache_gib * 2**30)
            return int(budget // self.block_bytes)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
        self._dummy_run(self.config.scheduler_config.max_num_tokens)
        activation_peak = torch.cuda.max_memory_allocated() - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        if cc.gpu_memory_utilization is not None:  # vLLM: everything we use stays under util * total
            budget = cc.gpu_memory_utilization * total - (total - free) - activation_peak
            return int(max(0, budget) // self.block_bytes)
        return int(max(0, free - activation_peak) * cc.kv_cache_free_gpu_memory_fraction // self.block_bytes)

    @torch.inference_mode()
    def _dummy_run(self, num_tokens: int, ids: torch.Tensor | None = None) -> None:
        """One prefill of num_tokens tokens (`ids`, else zeros) through a temporary cache: measures the peak
        activation memory, and calibrates dummy FP8 input scales."""
        nb = -(-num_tokens // self.block_size)
        dtype = self.config.cache_config.kv_cache_dtype
        for layer in self.attn_layers:
            layer.kv_cache = torch.zeros((2, nb * self.block_size, self.num_kv_heads, self.head_dim),
                                         dtype=dtype, device=self.device)
        if ids is None:
            ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        slots = torch.arange(num_tokens, device=self.device)
        pos = slots % self.config.model_config.max_seq_len  # the RoPE table ends at max_seq_len
        batch = ForwardBatch(pos, slots, torch.arange(nb, device=self.device)[None],
                             torch.tensor([num_tokens], device=self.device),
                             torch.tensor([0, num_tokens], device=self.device), [num_tokens], [num_tokens],
                             self.block_size)
        hidden = self.model(ids, pos, batch)
        self.model.compute_logits(hidden[-1:])
        for layer in self.attn_layers:
            layer.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _generator(self, req_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        if req_id not in self.generators:
            self.generators[req_id] = torch.Generator(device=self.device).manual_seed(seed)
        return self.generators[req_id]

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_req_ids:
            # NOTE: a preempted request keeps its generator: its recompute samples nothing until it catches up,
            # so its seeded stream continues exactly where it stopped.
            self.generators.pop(rid, None)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []  # token index whose logits are sampled, per sampling request
        sample_reqs = []
        prompt_rows: list[int] = []  # token index -> logprob of the next prompt token
        prompt_targets: list[int] = []
        prompt_owner: list[str] = []
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        block_tables = torch.zeros((len(sched.scheduled), max_blocks), dtype=torch.long)
        seq_lens, query_lens = [], []
        for i, s in enumerate(sched.scheduled):
            req, start, n = s.request, s.num_computed_tokens, s.num_new_tokens
            base = len(input_ids)
            input_ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            block_tables[i, : len(s.block_ids)] = torch.tensor(s.block_ids)
            seq_lens.append(start + n)
            query_lens.append(n)
            if start + n == req.num_tokens:
                sample_rows.append(base + n - 1)
                sample_reqs.append(req)
            if req.sampling_params.prompt_logprobs is not None:
                for p in range(max(start, req.num_prompt_logprobs), min(start + n, req.num_prompt_tokens - 1)):
                    prompt_rows.append(base + p - start)
                    prompt_targets.append(req.prompt_token_ids[p + 1])
                    prompt_owner.append(req.request_id)
        dev = self.device
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        graph_bs = None
        if self.graphs is not None and all(q == 1 for q in query_lens):
            graph_bs = self.graphs.size_for(len(query_lens))
        if graph_bs is not None:
            hidden = self.graphs.run(graph_bs, input_ids, positions, slots, block_tables, seq_lens)
        else:
            pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
            batch = ForwardBatch(pos_t, torch.tensor(slots, dtype=torch.long, device=dev), block_tables.to(dev),
                                 torch.tensor(seq_lens, device=dev), torch.tensor(cu, device=dev), seq_lens,
                                 query_lens, bs)
            hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev), pos_t, batch)
        out = RunnerOutput()
        if sample_rows:
            self._sample(hidden[sample_rows], sample_reqs, out)
        if prompt_rows:
            self._prompt_logprobs(hidden[prompt_rows], prompt_targets, prompt_owner, sched, out)
        return out

    def _sample(self, hidden: torch.Tensor, reqs: list, out: RunnerOutput) -> None:
        logits = self.model.compute_logits(hidden)
        params = [r.sampling_params for r in reqs]
        banned = [sorted(r.eos_token_ids | set(r.sampling_params.stop_token_ids))
                  if r.num_output_tokens < r.sampling_params.min_tokens else [] for r in reqs]
        md = SamplingMetadata(params, [self._generator(r.request_id, p.seed) for r, p in zip(reqs, params)],
                              [r.output_token_ids for r in reqs], [r.prompt_token_ids for r in reqs], banned)
        res = self.sampler(logits, md)
        sampled = res.sampled.tolist()
        lps = res.logprobs.tolist() if res.logprobs is not None else None
        ranks = res.ranks.tolist() if res.ranks is not None else None
        top_ids = res.top_ids.tolist() if res.top_ids is not None else None
        top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
        for i, (req, tok) in enumerate(zip(reqs, sampled)):
            out.sampled[req.request_id] = tok
            k = req.sampling_params.logprobs
            if k is None or lps is None:
                continue
            entry = {tok: Logprob(lps[i], ranks[i])}
            for r in range(k):
                entry.setdefault(top_ids[i][r], Logprob(top_lps[i][r], r + 1))
            out.logprobs[req.request_id] = entry

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], owners: list[str],
                         sched: SchedulerOutput, out: RunnerOutput) -> None:
        logprobs = self.model.compute_logits(hidden).log_softmax(dim=-1)
        tgt = torch.tensor(targets, device=logprobs.device)
        chosen = logprobs.gather(1, tgt[:, None])
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        k_by_req = {s.request.request_id: s.request.sampling_params.prompt_logprobs for s in sched.scheduled}
        k_max = max(k_by_req[o] for o in owners)
        top_lp, top_ids = logprobs.topk(max(k_max, 1), dim=-1)
        top_lp, top_ids, chosen = top_lp.tolist(), top_ids.tolist(), chosen.squeeze(1).tolist()
        for i, owner in enumerate(owners):
            entry = {targets[i]: Logprob(chosen[i], ranks[i])}
            for r in range(k_by_req[owner]):
                entry.setdefault(top_ids[i][r], Logprob(top_lp[i][r], r + 1))
            out.prompt_logprobs.setdefault(owner, []).append(entry)
