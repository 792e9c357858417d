"""CUDA graphs for decode steps: one replay instead of ~850 kernel launches per step.

At start, after the KV cache is allocated, the model's forward is captured once per batch size in
`sizes` (largest first, all sharing one memory pool), on static input buffers. A step whose requests all add
exactly one token (decodes) and whose batch fits a captured size replays the graph: its inputs are copied into
the buffers, the batch is padded up to the next captured size when `padding` is on (TensorRT-LLM's
`cuda_graph_config.enable_padding`; without it only exact sizes replay), and the padded rows write their K/V
to a scratch slot that no request owns and attend over an empty context. Anything else (prefills, larger
batches) runs eagerly. Needs the Triton attention backend: the torch reference loops over requests on the host.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from llamaserve.layers.attention import ForwardBatch

logger = logging.getLogger(__name__)


def default_sizes(max_size: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every multiple of 8 up to max_size."""
    sizes = [s for s in (1, 2, 4) if s <= max_size] + list(range(8, max_size + 1, 8))
    return sizes if max_size in sizes else sizes + [max_size]


class CudaGraphRunner:
    def __init__(self, model: Any, sizes: list[int], padding: bool, block_size: int, max_blocks: int,
                 scratch_slot: int, device: torch.device) -> None:
        self.model, self.sizes, self.padding = model, sorted(set(sizes)), padding
        self.block_size, self.scratch_slot, self.device = block_size, scratch_slot, device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.long, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.batches: dict[int, ForwardBatch] = {}

    def _batch(self, bs: int) -> ForwardBatch:
        from llamaserve.kernels.paged_attention import step_tiles

        b = ForwardBatch(self.positions[:bs], self.slots[:bs], self.block_tables[:bs], self.seq_lens[:bs],
                         self.query_start[: bs + 1], [0] * bs, [1] * bs, self.block_size)
        for layer in self.model.attention_layers():  # the attention tile table, static for a decode batch
            step_tiles(b.cache, b.query_lens_cpu, layer.num_heads // layer.num_kv_heads, self.device)
        return b

    @torch.inference_mode()
    def capture(self, quiet: bool = False) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        free_before = torch.cuda.mem_get_info()[0]
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):
            batch = self._batch(bs)
            self.batches[bs] = batch  # keeps the tile tables the graph reads alive
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model(self.input_ids[:bs], self.positions[:bs], batch)  # warm-up (autotuning, allocations)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs], batch)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        if quiet:
            return
        logger.info("captured %d CUDA graphs (batch %d..%d, padding %s) in %.1f s, %.0f MiB", len(self.sizes),
                    self.sizes[0], self.sizes[-1], "on" if self.padding else "off", time.perf_counter() - t0, used)

    def size_for(self, n: int) -> int | None:
        """The captured size a decode batch of n runs in, or None to run eagerly."""
        if n in self.graphs:
            return n
        if not self.padding:
            return None
        return next((s for s in self.sizes if s >= n), None)

    def run(self, bs: int, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Replay the graph of size bs on this step's n <= bs decode tokens (device tensors, copied into the
        static buffers on the stream: no host sync); returns hidden states [n, H]."""
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.seq_lens[:n].copy_(seq_lens)
        if bs > n:  # padded rows: scratch slot, empty context
            self.slots[n:bs].fill_(self.scratch_slot)
            self.seq_lens[n:bs].zero_()
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
        w = block_tables.shape[1]
        self.block_tables[:n, :w].copy_(block_tables)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
