"""Block pool, prefix cache and cache groups."""

from __future__ import annotations

from engine.kv_cache import BlockPool, KVCacheManager, PagedCacheSpec, StateSlotSpec
from engine.request import Request
from engine.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def manager(num_blocks=8, bs=4, **kw):
    return KVCacheManager(PagedCacheSpec(bs, 1024), num_blocks, **kw)


def test_pool_allocates_least_recently_freed_first():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert pool.num_free == 0
    pool.free(b)
    pool.free(a)
    assert pool.allocate(1) == [b[0]]


def test_prefix_hit_reuses_freed_blocks_and_leaves_one_token():
    kv = manager()
    r1 = req("a", range(10))                 # 2 full blocks + 2 tokens
    assert kv.allocate(r1, 10)
    kv.cache_full_blocks(r1, 10)
    first_blocks = kv.block_ids("a")[0][:2]
    kv.free(r1)
    r2 = req("b", range(8))                  # exactly 2 blocks: only 1 may hit (1 token left)
    hit, n = kv.find_cached_prefix(r2)
    assert n == 4 and hit == first_blocks[:1]
    r3 = req("c", list(range(10)) + [99])
    hit, n = kv.find_cached_prefix(r3)
    assert n == 8 and hit == first_blocks
    assert kv.allocate(r3, 3, hit)
    assert kv.block_ids("c")[0][:2] == first_blocks
    kv.free(r3)
    assert kv.num_free_blocks == 8


def test_different_prefix_misses():
    kv = manager()
    r1 = req("a", range(8))
    kv.allocate(r1, 8)
    kv.cache_full_blocks(r1, 8)
    hit, n = kv.find_cached_prefix(req("b", [1] + list(range(1, 9))))
    assert n == 0 and hit == []


def test_allocation_failure_changes_nothing():
    kv = manager(num_blocks=3)
    r = req("a", range(20))
    assert not kv.allocate(r, 20)
    assert kv.num_free_blocks == 3 and kv.block_ids("a") == [[]]


def test_shared_blocks_are_reference_counted():
    kv = manager()
    r1 = req("a", range(9))
    kv.allocate(r1, 9)
    kv.cache_full_blocks(r1, 9)
    r2 = req("b", range(9))
    hit, _ = kv.find_cached_prefix(r2)
    kv.allocate(r2, 1, hit)
    kv.free(r1)
    # r2 still holds the shared blocks: they must not be handed out.
    fresh = kv.paged.pool.allocate(kv.num_free_blocks)
    assert not set(fresh) & set(kv.block_ids("b")[0])


def test_state_slot_group_gives_one_slot_per_request_and_disables_prefix_cache():
    kv = KVCacheManager(PagedCacheSpec(4, 1024), 16, True, StateSlotSpec(4096), num_state_slots=2)
    assert not kv.enable_prefix_caching
    a, b, c = req("a", range(30)), req("b", range(3)), req("c", range(3))
    assert kv.allocate(a, 30) and kv.allocate(b, 3)
    assert len(kv.block_ids("a")[1]) == 1 and len(kv.block_ids("a")[0]) == 8
    assert not kv.allocate(c, 3)            # no state slot left
    kv.free(b)
    assert kv.allocate(c, 3)
