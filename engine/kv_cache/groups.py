"""Cache groups: the kinds of per-request cache state an engine can hold.

A paged group grows with the sequence (attention KV, MLA latent KV): one block per
`block_size` tokens, shared across requests through the prefix cache. A state-slot
group holds a fixed-size state per request (Mamba-2 conv and SSM state): one slot for
the request's lifetime, whatever its length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from engine.kv_cache.block_pool import BlockPool


@dataclass(frozen=True)
class PagedCacheSpec:
    block_size: int
    bytes_per_block: int  # all layers of the group, so a block moves as one piece


@dataclass(frozen=True)
class StateSlotSpec:
    bytes_per_slot: int


class CacheGroup(ABC):
    """Per-request block lists over one pool; subclasses say how many blocks a length needs."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: dict[str, list[int]] = {}

    @abstractmethod
    def blocks_needed(self, req_id: str, num_tokens: int) -> int:
        """How many more blocks the request needs to hold `num_tokens` tokens."""

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        new = self.pool.allocate(self.blocks_needed(req_id, num_tokens))
        self.blocks.setdefault(req_id, []).extend(new)
        return new

    def free(self, req_id: str) -> None:
        # Tail first, so the least reusable blocks are the first evicted.
        self.pool.free(list(reversed(self.blocks.pop(req_id, []))))


class PagedGroup(CacheGroup):
    def __init__(self, spec: PagedCacheSpec, num_blocks: int, enable_caching: bool) -> None:
        super().__init__(BlockPool(num_blocks, enable_caching))
        self.spec = spec

    def blocks_needed(self, req_id: str, num_tokens: int) -> int:
        have = len(self.blocks.get(req_id, ()))
        return max(0, -(-num_tokens // self.spec.block_size) - have)


class StateSlotGroup(CacheGroup):
    def __init__(self, spec: StateSlotSpec, num_slots: int) -> None:
        super().__init__(BlockPool(num_slots, enable_caching=False))
        self.spec = spec

    def blocks_needed(self, req_id: str, num_tokens: int) -> int:
        return 0 if req_id in self.blocks else 1
