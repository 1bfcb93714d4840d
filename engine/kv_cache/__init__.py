"""Block pool, prefix cache and the cache-group manager."""

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.groups import PagedCacheSpec, StateSlotSpec
from engine.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager", "PagedCacheSpec", "StateSlotSpec"]
