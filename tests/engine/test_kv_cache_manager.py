"""KVCacheManager: allocation, prefix sharing, LRU eviction of unreferenced blocks only, full release."""

from __future__ import annotations

from llamaserve.engine.kv_cache_manager import KVCacheManager
from llamaserve.engine.request import Request
from llamaserve.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), frozenset(), max_tokens=4)


def test_allocate_grows_by_blocks_and_fails_cleanly():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = req("a", list(range(10)))
    assert len(kv.allocate_slots(r, 10)) == 3
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) == []  # fits in the third block
    assert len(kv.allocate_slots(r, 6)) == 1
    r.num_computed_tokens = 16
    assert kv.allocate_slots(r, 1) is None  # out of blocks: nothing changes
    assert len(kv.block_ids("a")) == 4 and kv.num_free_blocks == 0
    kv.free(r)
    assert kv.num_free_blocks == 4


def test_prefix_hits_share_blocks_and_leave_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(12)))
    kv.allocate_slots(a, 12)
    b = req("b", list(range(12)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.block_ids("a")[:2]  # last block recomputed: 1 token left
    kv.allocate_slots(b, 12 - n, hits)
    shared = kv.block_ids("a")[:2]
    assert kv.block_ids("b")[:2] == shared
    assert all(kv.pool.blocks[i].ref_cnt == 2 for i in shared)
    c = req("c", list(range(8)) + [99, 98, 97, 96, 95])
    assert kv.get_computed_blocks(c)[1] == 8
    d = req("d", [7] + list(range(12)))  # different first block: no hit
    assert kv.get_computed_blocks(d)[1] == 0
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_lru_evicts_unreferenced_and_oldest_first():
    kv = KVCacheManager(num_blocks=5, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)  # 3 blocks, 2 full ones cached
    kv.free(a)
    b = req("b", [1, 2, 3, 4, 6])
    hits, n = kv.get_computed_blocks(b)
    assert n == 4  # a's freed blocks are still cached
    kv.allocate_slots(b, 1, hits)  # 2 shared blocks + 1 new; a's partial third block is next to evict
    # b holds the two cached blocks; taking 2 more evicts the unreferenced ones, never b's
    other = req("o", [9, 9, 9, 9])
    assert len(kv.allocate_slots(other, 4)) == 2
    assert set(kv.block_ids("b")).isdisjoint(kv.block_ids("o"))
    assert kv.get_computed_blocks(req("x", [1, 2, 3, 4, 7]))[1] == 4
    kv.free(b)
    kv.free(other)
    assert kv.num_free_blocks == 5
