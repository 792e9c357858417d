"""CUDA graphs for decode steps: one replay instead of ~850 kernel launches per step.

At start, after the KV cache is allocated, the model's forward is captured once per batch size in
`sizes` (largest first, all sharing one memory pool), on static input buffers. A step whose requests all add
exactly one token (decodes) and whose batch fits a captured size replays the graph: its inputs are copied into
the buffers, the batch is padded up to the next captured size when `padding` is on (TensorRT-LLM's
`cuda_graph_config.enable_padding`; without it only exact sizes replay), and the padded rows write their K/V
to a scratch slot that no request owns and attend over an empty context. Anything else (prefills, larger
batches) runs eagerly. Needs the Triton attention backend: the torch reference loops over requests on the host.

A step's inputs travel in one host-to-device copy: the static buffers of a size-bs graph are views into one
int64 buffer laid out [token ids | positions | slots | sequence lengths | sampled-row index | block tables]
(bs entries each, tables bs x max_blocks), and `run` fills a pinned host array of that layout, padding rows
included. A token still being sampled by the previous step (overlap scheduling) has its sampled-row index set:
the graph's first kernels take it from `sampled`, where the model runner leaves each step's sampled ids. Every
separate copy or fill is a 2-3 us stop of the GPU between steps; at batch 1 the 14 of them took ~45 us.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from llamaserve.layers.attention import ForwardBatch

logger = logging.getLogger(__name__)

FIELDS = 5  # per-row int64 inputs: token id, position, slot, sequence length, sampled-row index


def default_sizes(max_size: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every multiple of 8 up to max_size."""
    sizes = [s for s in (1, 2, 4) if s <= max_size] + list(range(8, max_size + 1, 8))
    return sizes if max_size in sizes else sizes + [max_size]


class CudaGraphRunner:
    def __init__(self, model: Any, sizes: list[int], padding: bool, block_size: int, max_blocks: int,
                 scratch_slot: int, device: torch.device, max_sampled: int = 0) -> None:
        self.model, self.sizes, self.padding = model, sorted(set(sizes)), padding
        self.block_size, self.scratch_slot, self.device = block_size, scratch_slot, device
        n = self.sizes[-1]
        self.max_blocks = max_blocks
        self.inputs = torch.zeros(n * (FIELDS + max_blocks), dtype=torch.long, device=device)
        # the previous step's sampled ids (the model runner copies them here), read by the next step's graph
        self.sampled = torch.zeros(max(n, max_sampled), dtype=torch.long, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.batches: dict[int, ForwardBatch] = {}

    def views(self, bs: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, seq_lens, sampled_row, block_tables) of a size-bs graph: views of `inputs`."""
        flat = self.inputs[: bs * (FIELDS + self.max_blocks)]
        return (*flat[: FIELDS * bs].view(FIELDS, bs), flat[FIELDS * bs :].view(bs, self.max_blocks))

    def _batch(self, bs: int) -> ForwardBatch:
        from llamaserve.kernels.paged_attention import step_tiles

        _, positions, slots, seq_lens, _, tables = self.views(bs)
        b = ForwardBatch(positions, slots, tables, seq_lens, self.query_start[: bs + 1], [0] * bs, [1] * bs,
                         self.block_size)
        for layer in self.model.attention_layers():  # the attention tile table, static for a decode batch
            step_tiles(b.cache, b.query_lens_cpu, layer.num_heads // layer.num_kv_heads, self.device)
        return b

    def _forward(self, bs: int, batch: ForwardBatch) -> torch.Tensor:
        """The captured work: tokens still being sampled come from `sampled`, then the model."""
        ids, positions, _, _, row, _ = self.views(bs)
        if ids.is_cuda:  # one launch (kernels/sampling.py), not torch's five
            from llamaserve.kernels.sampling import fill_sampled

            fill_sampled(ids, row, self.sampled)
        else:
            ids.copy_(torch.where(row >= 0, self.sampled[row.clamp(min=0)], ids))
        return self.model(ids, positions, batch)

    @torch.inference_mode()
    def capture(self, quiet: bool = False) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        free_before = torch.cuda.mem_get_info()[0]
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):
            batch = self._batch(bs)
            self.batches[bs] = batch  # keeps the tile tables the graph reads alive
            self._fill(bs, [], [], [], np.zeros((0, 0), dtype=np.int64), [], {})  # all padding rows
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(bs, batch)  # warm-up (autotuning, allocations)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs, batch)
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

    def _fill(self, bs: int, input_ids: list[int], positions: list[int], slots: list[int],
              block_tables: np.ndarray, seq_lens: list[int], sampled_rows: dict[int, int]) -> None:
        """The size-bs inputs in one host-to-device copy from a pinned host array of their layout; rows past the
        step's n tokens are padding: token 0 at position 0, the scratch slot, an empty context, no sampled row."""
        n = len(input_ids)
        pinned = self.device.type == "cuda"
        host = torch.empty(bs * (FIELDS + self.max_blocks), dtype=torch.long, pin_memory=pinned)
        arr = host.numpy()
        head = arr[: FIELDS * bs].reshape(FIELDS, bs)
        head[:, n:] = 0
        head[2, n:] = self.scratch_slot
        head[4] = -1
        head[0, :n], head[1, :n], head[2, :n], head[3, :n] = input_ids, positions, slots, seq_lens
        for i, r in sampled_rows.items():
            head[4, i] = r
        tables = arr[FIELDS * bs :].reshape(bs, self.max_blocks)
        tables[:] = 0
        tables[:n, : block_tables.shape[1]] = block_tables
        self.inputs[: host.numel()].copy_(host, non_blocking=True)

    def run(self, bs: int, input_ids: list[int], positions: list[int], slots: list[int], block_tables: np.ndarray,
            seq_lens: list[int], sampled_rows: dict[int, int]) -> torch.Tensor:
        """Replay the graph of size bs on this step's n <= bs decode tokens (host values; `sampled_rows` maps a
        token index to the row of `sampled` that holds its id): one host-to-device copy, then the replay, with
        no host sync. Returns hidden states [n, H]."""
        self._fill(bs, input_ids, positions, slots, block_tables, seq_lens, sampled_rows)
        self.graphs[bs].replay()
        return self.outputs[bs][: len(input_ids)]

