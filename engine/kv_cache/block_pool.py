"""A fixed pool of KV blocks with reference counts and a prefix cache.

Free blocks wait in LRU order. A freed block keeps its contents and its hash until it
is handed out again, so a later request with the same prefix can take it back
(a "cache hit") without recomputing; the block evicted on allocation is always the
least recently freed one.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # Prefix-cache counters (queries and hits in tokens), read by metrics.
        self.queries = 0
        self.hits = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        # Which blocks are taken is LRU's choice; their order is ours. Ascending ids turn
        # blocks freed together back into runs of adjacent memory, which a KV transfer
        # moves as one descriptor instead of one per block.
        out.sort()
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks that reach zero join the LRU tail
        in the order given (callers pass a request's tail first, so it is evicted first)."""
        for block_id in block_ids:
            self.ref_cnt[block_id] -= 1
            assert self.ref_cnt[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cache hits; a hit that was free leaves the free queue."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
            self.ref_cnt[block_id] += 1

    def cache(self, block_id: int, block_hash: bytes) -> None:
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        # Two requests may fill identical blocks in the same step; keep the first.
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._cached.values()):
            self.block_hash[block_id] = None
        self._cached.clear()

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            self.block_hash[block_id] = None
            if self._cached.get(h) == block_id:
                del self._cached[h]
