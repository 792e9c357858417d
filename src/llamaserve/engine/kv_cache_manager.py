"""Paged KV cache accounting: fixed-size blocks, per-request block lists, ref counts, prefix caching.

Owns block ids, never tensors (the model runner owns the tensors; slot = block_id * block_size + offset).
Invariants, checked by the tests after every step:
- a block is either free (ref_cnt 0, in the LRU free queue) or referenced (ref_cnt = number of requests whose
  block list holds it); a block id appears at most once in one request's list;
- prefix caching: a full block is registered under a chained hash of (parent hash, its tokens); a later request
  whose prompt starts with the same tokens shares those blocks. Free blocks keep their hash until they are
  reused, so the queue's oldest-freed blocks are evicted first (LRU), and only unreferenced blocks ever are;
- when every request has ended, however it ended, all blocks are free.
Called by the scheduler only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llamaserve.engine.request import Request


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVBlock] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, n: int) -> list[KVBlock]:
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)  # least recently freed first
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        for b in blocks:
            if b.ref_cnt == 0:
                del self.free_queue[b.block_id]
            b.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference of each block, in the order they should be evicted."""
        for b in blocks:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, f"block {b.block_id} released more often than taken"
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = b

    def register(self, block: KVBlock, block_hash: int) -> None:
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_registered: dict[str, int] = {}
        self.req_block_ids: dict[str, list[int]] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.num_blocks

    def _block_hashes(self, request: Request, num_tokens: int) -> list[int]:
        """Chained hashes of the request's full blocks covering its first num_tokens tokens."""
        hashes, bs, toks = request.block_hashes, self.block_size, request.all_token_ids
        num_tokens = min(num_tokens, request.num_known_tokens)
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(toks[i * bs : (i + 1) * bs]))))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a waiting request: (blocks, tokens). At least one token is left to compute."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in self._block_hashes(request, max_blocks * self.block_size)[:max_blocks]:
            block = self.pool.cached.get(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[KVBlock] | None:
        """Give the request room for num_new_tokens more tokens; None (nothing changed) if blocks run out."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        need = max(0, -(-total // self.block_size) - len(blocks) - len(computed_blocks))
        free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # taking them shrinks the free queue
        if need > self.pool.num_free - free_hits:
            return None
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new_blocks = self.pool.take(need)
        blocks.extend(new_blocks)
        if self.enable_prefix_caching:
            # NOTE: registering before the step runs is safe: the blocks are written in this very step, and a
            # request that hits them is scheduled after this one, within the same forward pass.
            start = self.num_registered.get(request.request_id, 0)
            # a block holding a placeholder (overlap scheduling) is registered once its token is known
            num_full = min(total, request.num_known_tokens) // self.block_size
            hashes = self._block_hashes(request, total)
            for i in range(start, num_full):
                self.pool.register(blocks[i], hashes[i])
            self.num_registered[request.request_id] = max(start, num_full)
        return new_blocks

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_registered.pop(request.request_id, None)
        self.req_block_ids.pop(request.request_id, None)
        self.pool.release(blocks[::-1])  # tail blocks are the least likely to be shared: evict them first

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids (a list kept beside its blocks; read it, do not change it)."""
        blocks = self.req_blocks.get(request_id, [])
        ids = self.req_block_ids.get(request_id)
        if ids is None or len(ids) != len(blocks):
            ids = self.req_block_ids[request_id] = [b.block_id for b in blocks]
        return ids
