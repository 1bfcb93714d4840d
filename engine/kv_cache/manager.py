"""The KV-cache manager: allocation across cache groups and prefix-cache lookups.

Group 0 is always the paged attention group (GQA KV or MLA latent KV for every
attention layer, one block table). A hybrid model adds a state-slot group. Prefix
caching needs every group to be reusable by prefix, so it is on only for models
without state slots.
"""

from __future__ import annotations

import hashlib
import logging
from array import array

from engine.kv_cache.groups import CacheGroup, PagedCacheSpec, PagedGroup, StateSlotGroup, StateSlotSpec
from engine.request import Request

log = logging.getLogger("engine.kv_cache")

def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Hash chain over full blocks: a block's hash covers every token before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(self, paged: PagedCacheSpec, num_blocks: int, enable_prefix_caching: bool = True,
                 state: StateSlotSpec | None = None, num_state_slots: int = 0) -> None:
        caching = enable_prefix_caching and state is None
        if enable_prefix_caching and state is not None:
            log.info("prefix caching is off for this hybrid model: its Mamba state is per request, not per block")
        self.paged = PagedGroup(paged, num_blocks, caching)
        self.groups: list[CacheGroup] = [self.paged]
        if state is not None:
            self.groups.append(StateSlotGroup(state, num_state_slots))
        self.block_size = paged.block_size
        self.enable_prefix_caching = caching
        # Hashes of each request's full blocks, extended as blocks fill.
        self._hashes: dict[str, list[bytes]] = {}

    @property
    def usage(self) -> float:
        return self.paged.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.paged.pool.num_free

    def block_ids(self, req_id: str) -> list[list[int]]:
        return [g.blocks.get(req_id, []) for g in self.groups]

    def find_cached_prefix(self, req: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks for the request's tokens. At least one token
        is always left to compute, so the request still produces logits."""
        if not self.enable_prefix_caching:
            return [], 0
        tokens = req.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hashes = self._hash_blocks(req.request_id, tokens, max_blocks)
        hit = []
        for h in hashes[:max_blocks]:
            block_id = self.paged.pool.lookup(h)
            if block_id is None:
                break
            hit.append(block_id)
        pool = self.paged.pool
        pool.queries += len(tokens)
        pool.hits += len(hit) * self.block_size
        return hit, len(hit) * self.block_size

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of `req` (after taking `cached_blocks`
        from the prefix cache). Returns False, changing nothing, when the pools are short."""
        rid = req.request_id
        cached_blocks = cached_blocks or []
        total = req.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        # Hits that sit in the free queue would be counted as free below; they are not.
        free_hits = sum(1 for b in cached_blocks if self.paged.pool.ref_cnt[b] == 0)
        for g in self.groups:
            need = g.blocks_needed(rid, total) - (len(cached_blocks) if g is self.paged else 0)
            spare = g.pool.num_free - (free_hits if g is self.paged else 0)
            if need > spare:
                return False
        if cached_blocks:
            self.paged.pool.touch(cached_blocks)
            self.paged.blocks.setdefault(rid, []).extend(cached_blocks)
        for g in self.groups:
            g.allocate(rid, total)
        return True

    def cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Register the request's blocks that are full once `num_tokens` are computed."""
        if not self.enable_prefix_caching:
            return
        n_full = num_tokens // self.block_size
        hashes = self._hash_blocks(req.request_id, req.all_token_ids, n_full)
        blocks = self.paged.blocks.get(req.request_id, [])
        for i in range(min(n_full, len(blocks))):
            self.paged.pool.cache(blocks[i], hashes[i])

    def free(self, req: Request) -> None:
        for g in self.groups:
            g.free(req.request_id)
        self._hashes.pop(req.request_id, None)

    def _hash_blocks(self, req_id: str, tokens: list[int], n_blocks: int) -> list[bytes]:
        hashes = self._hashes.setdefault(req_id, [])
        bs = self.block_size
        while len(hashes) < n_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes
