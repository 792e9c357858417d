"""ModelRunner: loads the model, owns the KV cache tensors, and executes one scheduled step.

From a `SchedulerOutput` it builds the flattened step (`input_ids`, `positions`, `ForwardBatch`), runs the model,
computes logits only for rows that need them (the last token of each request that samples, and prompt
positions whose logprobs were asked for), samples, and returns plain Python results for the scheduler.
KV cache size: `num_kv_blocks` if set; on CUDA, `kv_cache_free_gpu_memory_fraction` of the memory left after
the weights, a profiled activation peak (one prefill of max_num_tokens) and the CUDA-graph pool (measured by a
trial capture of the largest decode graph on a throwaway cache); on CPU that fraction of available RAM, capped
at `cpu_kv_cache_gib`. The start-up log gives the breakdown and the KV capacity in tokens.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from llamaserve.config import EngineConfig
from llamaserve.device_utils import h2d
from llamaserve.engine.request import PLACEHOLDER
from llamaserve.engine.scheduler import SchedulerOutput
from llamaserve.layers.attention import ForwardBatch
from llamaserve.layers.quantization import calibrate_input_scales
from llamaserve.layers.sampler import Sampler, SamplingMetadata, row_seed
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
        self.graph_sizes = config.cuda_graph_sizes if getattr(self.model, "supports_cuda_graphs", True) else []
        if config.cuda_graph_sizes and not self.graph_sizes:
            logger.warning("%s runs eagerly: its MoE reference path cannot be captured in a CUDA graph",
                           type(self.model).__name__)
        self.num_blocks = cc.num_kv_blocks or self._profile_num_blocks()
        if self.num_blocks < 1:
            raise ValueError("no memory is left for the KV cache; raise kv_cache_free_gpu_memory_fraction or "
                             "use a smaller model")
        # one scratch block past the pool's blocks: padded CUDA-graph rows write their K/V there
        scratch = 1 if self.graph_sizes else 0
        shape = (2, (self.num_blocks + scratch) * self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=cc.kv_cache_dtype, device=self.device)
                          for _ in self.attn_layers]
        for layer, cache in zip(self.attn_layers, self.kv_caches):
            layer.kv_cache = cache
        self.graphs = None
        if self.graph_sizes:
            from llamaserve.executor.cuda_graphs import CudaGraphRunner

            max_blocks = -(-config.scheduler_config.max_seq_len // self.block_size)
            self.graphs = CudaGraphRunner(self.model, self.graph_sizes, config.cuda_graph_padding,
                                          self.block_size, max_blocks, self.num_blocks * self.block_size,
                                          self.device, max_sampled=config.scheduler_config.max_batch_size)
            self.graphs.capture()
        self.sampler = Sampler(config.kernel_backend)
        self.rng = random.Random(mc.seed)  # draw seeds of requests without their own seed
        self._last_sampled: torch.Tensor | None = None  # sampled ids of the last queued step, on the device
        self._last_rows: dict[str, int] = {}
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
        graphs = self._trial_graph_bytes()
        free, total = torch.cuda.mem_get_info()
        if cc.gpu_memory_utilization is not None:  # vLLM: everything we use stays under util * total
            budget = cc.gpu_memory_utilization * total - (total - free) - activation_peak - graphs
        else:
            budget = (free - activation_peak - graphs) * cc.kv_cache_free_gpu_memory_fraction
        logger.info("GPU memory: %.2f GiB total, weights %.2f GiB, activation peak %.2f GiB (%d-token prefill), "
                    "CUDA graphs ~%.0f MiB, %.2f GiB free before the KV cache; KV cache budget %.2f GiB",
                    total / 2**30, weights / 2**30, activation_peak / 2**30,
                    self.config.scheduler_config.max_num_tokens, graphs / 2**20, free / 2**30,
                    max(0, budget) / 2**30)
        return int(max(0, budget) // self.block_bytes)

    def _trial_graph_bytes(self) -> int:
        """Memory the CUDA-graph pool will take: capture the largest decode graph on a one-block cache, measure,
        and release it (the pool of all sizes is about the largest one's, since they share it)."""
        if not self.graph_sizes:
            return 0
        from llamaserve.executor.cuda_graphs import CudaGraphRunner

        dtype = self.config.cache_config.kv_cache_dtype
        for layer in self.attn_layers:
            layer.kv_cache = torch.zeros((2, self.block_size, self.num_kv_heads, self.head_dim), dtype=dtype,
                                         device=self.device)
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        trial = CudaGraphRunner(self.model, [max(self.graph_sizes)], True, self.block_size, 1, 0,
                                self.device)
        trial.capture(quiet=True)
        used = free_before - torch.cuda.mem_get_info()[0]
        del trial
        for layer in self.attn_layers:
            layer.kv_cache = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return max(0, used)

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

    def _row_seeds(self, reqs: list) -> list[int]:
        """Per-row draw seeds: (request seed or the engine's RNG, index of the token being sampled)."""
        return [row_seed(r.sampling_params.seed, r.num_output_tokens) if r.sampling_params.seed is not None
                else self.rng.getrandbits(31) for r in reqs]

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> PendingOutput:
        """Queue one step on the device and return at once; `PendingOutput.result()` waits for its results.

        A request's last input token may still be unknown on the host (overlap scheduling: it is being sampled
        by the previous step, which is still running); the engine marks it PLACEHOLDER and the token is taken
        from the previous step's sampled ids on the device.
        """
        bs = self.block_size
        n_req = len(sched.scheduled)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []  # token index whose logits are sampled, per sampling request
        sample_reqs = []
        prompt_rows: list[int] = []  # token index -> logprob of the next prompt token
        prompt_targets: list[int] = []
        prompt_owner: list[str] = []
        fill_dst: list[int] = []  # input positions whose token comes from the previous step's samples
        fill_src: list[int] = []
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        block_tables = np.zeros((n_req, max_blocks), dtype=np.int64)
        seq_lens, query_lens = [], []
        for i, s in enumerate(sched.scheduled):
            req, start, n = s.request, s.num_computed_tokens, s.num_new_tokens
            base = len(input_ids)
            toks = req.all_token_ids[start : start + n]
            if toks[-1] == PLACEHOLDER:
                fill_dst.append(base + n - 1)
                fill_src.append(self._last_rows[req.request_id])
            input_ids.extend(toks)
            block_ids = s.block_ids
            if n == 1:
                positions.append(start)
                slots.append(block_ids[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, start + n))
                slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            block_tables[i, : len(block_ids)] = block_ids
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
        if fill_dst and self._last_sampled is None:
            raise RuntimeError("a step has placeholder tokens but no previous step sampled")
        graph_bs = None
        if self.graphs is not None and len(input_ids) == n_req:  # all decodes
            graph_bs = self.graphs.size_for(n_req)
        if graph_bs is not None:  # inputs in one copy; placeholders from the graph runner's `sampled`
            hidden = self.graphs.run(graph_bs, input_ids, positions, slots, block_tables, seq_lens,
                                     dict(zip(fill_dst, fill_src)))
        else:
            ids_t = h2d(input_ids, torch.long, dev)
            if fill_dst:
                ids_t[h2d(fill_dst, torch.long, dev)] = self._last_sampled[h2d(fill_src, torch.long, dev)]
            pos_t = h2d(positions, torch.long, dev)
            slots_t = h2d(slots, torch.long, dev)
            tables_t = h2d(block_tables, torch.long, dev)
            seq_t = h2d(seq_lens, torch.long, dev)
            cu = [0]
            for q in query_lens:
                cu.append(cu[-1] + q)
            batch = ForwardBatch(pos_t, slots_t, tables_t, seq_t, h2d(cu, torch.long, dev), seq_lens, query_lens, bs)
            hidden = self.model(ids_t, pos_t, batch)
        pending = PendingOutput(dev)
        if sample_rows:  # every token of a decode step is sampled: no gather
            rows = hidden if len(sample_rows) == hidden.shape[0] == len(input_ids) else \
                hidden[h2d(sample_rows, torch.long, dev)]
            self._sample(rows, sample_reqs, pending)
        if prompt_rows:
            self._prompt_logprobs(hidden[h2d(prompt_rows, torch.long, dev)], prompt_targets, prompt_owner, sched,
                                  pending)
        pending.start_copy()
        return pending

    def _sample(self, hidden: torch.Tensor, reqs: list, pending: PendingOutput) -> None:
        params = [r.sampling_params for r in reqs]
        banned = [sorted(r.eos_token_ids | set(r.sampling_params.stop_token_ids))
                  if r.num_output_tokens < r.sampling_params.min_tokens else [] for r in reqs]
        md = SamplingMetadata(params, self._row_seeds(reqs), [r.output_token_ids for r in reqs],
                              [r.prompt_token_ids for r in reqs], banned)
        # the lm_head's own output: the sampler casts it to float32 unless the batch is plain greedy
        res = self.sampler(self.model.compute_logits(hidden, upcast=False), md)
        self._last_sampled = res.sampled
        if self.graphs is not None:  # where the next decode graph reads its placeholder tokens
            flat = res.sampled.reshape(-1)
            self.graphs.sampled[: flat.numel()].copy_(flat)
        self._last_rows = {r.request_id: i for i, r in enumerate(reqs)}
        pending.sample_ids = [r.request_id for r in reqs]
        pending.logprob_k = [r.sampling_params.logprobs for r in reqs]
        pending.add("sampled", res.sampled)
        if res.logprobs is not None:
            pending.add("lps", res.logprobs)
            pending.add("ranks", res.ranks)
            if res.top_ids is not None:
                pending.add("top_ids", res.top_ids)
                pending.add("top_lps", res.top_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], owners: list[str],
                         sched: SchedulerOutput, pending: PendingOutput) -> None:
        logprobs = self.model.compute_logits(hidden).log_softmax(dim=-1)
        tgt = h2d(targets, torch.long, logprobs.device)
        chosen = logprobs.gather(1, tgt[:, None])
        k_by_req = {s.request.request_id: s.request.sampling_params.prompt_logprobs for s in sched.scheduled}
        k_max = max(k_by_req[o] for o in owners)
        top_lp, top_ids = logprobs.topk(max(k_max, 1), dim=-1)
        pending.prompt = (targets, owners, k_by_req)
        pending.add("p_ranks", (logprobs > chosen).sum(dim=-1) + 1)
        pending.add("p_chosen", chosen.squeeze(1))
        pending.add("p_top_lps", top_lp)
        pending.add("p_top_ids", top_ids)


class PendingOutput:
    """The device results of one queued step, copied to pinned host memory behind the step's work; result()
    waits for that copy alone (one host-device sync per step), never for work queued after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self.sample_ids: list[str] = []
        self.logprob_k: list[int | None] = []
        self.prompt: tuple | None = None
        self.event = None

    def add(self, name: str, t: torch.Tensor) -> None:
        self.tensors[name] = t

    def start_copy(self) -> None:
        if self.device.type != "cuda":
            return
        self.tensors = {k: v.to("cpu", non_blocking=True) for k, v in self.tensors.items()}
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> RunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        host = {k: v.tolist() for k, v in self.tensors.items()}
        out = RunnerOutput()
        sampled = host.get("sampled", [])
        for i, (rid, tok) in enumerate(zip(self.sample_ids, sampled)):
            out.sampled[rid] = tok
            k = self.logprob_k[i]
            if k is None or "lps" not in host:
                continue
            entry = {tok: Logprob(host["lps"][i], host["ranks"][i])}
            for r in range(k):
                entry.setdefault(host["top_ids"][i][r], Logprob(host["top_lps"][i][r], r + 1))
            out.logprobs[rid] = entry
        if self.prompt is not None:
            targets, owners, k_by_req = self.prompt
            for i, owner in enumerate(owners):
                entry = {targets[i]: Logprob(host["p_chosen"][i], host["p_ranks"][i])}
                for r in range(k_by_req[owner]):
                    entry.setdefault(host["p_top_ids"][i][r], Logprob(host["p_top_lps"][i][r], r + 1))
                out.prompt_logprobs.setdefault(owner, []).append(entry)
        return out
