"""Which expert weights move where when one layer's placement changes: a pure plan
every rank computes identically from the old and new maps (no negotiation).

Maps are rows of global slot ids over the *current* group (slot s lives on rank
s // slots_per_rank); -1 marks a slot with no expert (a rank that joined and has no
weights yet, or one about to leave).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Transfer:
    expert: int
    src_rank: int
    src_slot: int      # local slot index on the source rank
    dst_rank: int
    dst_slot: int      # local slot index on the destination rank

    @property
    def is_local(self) -> bool:
        return self.src_rank == self.dst_rank


def preserve_slots(old: list[int], new: list[int], slots_per_rank: int) -> list[int]:
    """Reorder each rank's new experts so experts that stay on a rank keep their old
    local slot: same placement (same multiset per rank), fewer copies."""
    if len(old) != len(new) or len(new) % slots_per_rank:
        raise ValueError(f"maps of {len(old)} and {len(new)} slots do not fit {slots_per_rank} slots per rank")
    out: list[int] = []
    for start in range(0, len(new), slots_per_rank):
        o, n = old[start:start + slots_per_rank], new[start:start + slots_per_rank]
        want = Counter(e for e in n if e >= 0)
        row = [-1] * slots_per_rank
        for j, e in enumerate(o):
            if e >= 0 and want[e] > 0:
                row[j] = e
                want[e] -= 1
        rest = sorted(e for e, k in want.items() for _ in range(k))
        free = [j for j in range(slots_per_rank) if row[j] == -1]
        for j, e in zip(free, rest):
            row[j] = e
        out += row
    return out


def plan_layer(old: list[int], new: list[int], slots_per_rank: int) -> list[Transfer]:
    """One transfer for every slot whose new expert it does not already hold. The source
    is a slot of the same rank when it has the expert (a local copy), else one of the
    holders, taken in turn so a hot expert's new replicas are sent by different ranks."""
    if len(old) != len(new):
        raise ValueError(f"old map has {len(old)} slots, new map {len(new)}")
    holders: dict[int, list[tuple[int, int]]] = {}
    for s, e in enumerate(old):
        if e >= 0:
            holders.setdefault(e, []).append(divmod(s, slots_per_rank))
    turn: Counter = Counter()
    transfers = []
    for s, e in enumerate(new):
        if e < 0 or old[s] == e:
            continue
        if e not in holders:
            raise ValueError(f"expert {e} has no copy in the current placement; its weights are not on any rank")
        rank, slot = divmod(s, slots_per_rank)
        local = [h for h in holders[e] if h[0] == rank]
        if local:
            src = local[0]
        else:
            src = holders[e][turn[e] % len(holders[e])]
            turn[e] += 1
        transfers.append(Transfer(e, src[0], src[1], rank, slot))
    return transfers
