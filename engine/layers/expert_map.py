"""Where the experts of every MoE layer live: the one expert-map type.

Routers pick logical experts; each MoE layer sends a choice to one physical slot. A
map holds, per MoE layer:
  phy2log [layers, slots]: the logical expert in each slot (-1: the slot holds none,
      e.g. a rank that joined and has no weights yet; such a slot is never routed to);
  log2phy [layers, logical, width]: the slots of each expert in increasing slot order,
      padded with -1; width is the most copies any expert has (or more, if asked);
  logcnt [layers, logical]: how many slots each expert has.
log2phy and logcnt are always derived from phy2log here, so the three cannot disagree.
The MoE layer (engine/layers/moe.py), the EP engine and EPLB (eplb/) all use this type.
Slot s of a group of ranks with S slots each lives on rank s // S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class ExpertMap:
    phy2log: Tensor
    log2phy: Tensor
    logcnt: Tensor

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logcnt.shape[1]

    @classmethod
    def from_phy2log(cls, phy2log: Tensor | list, num_logical: int, width: int | None = None) -> ExpertMap:
        """Derive log2phy and logcnt from phy2log [layers, slots] (int, -1 = empty slot);
        width: the least log2phy width (a layer whose maps are swapped in place keeps one
        width)."""
        phy2log = torch.as_tensor(phy2log).to(device="cpu", dtype=torch.int64).contiguous()
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {tuple(phy2log.shape)}")
        layers, slots = phy2log.shape
        if slots and (phy2log.min() < -1 or phy2log.max() >= num_logical):
            raise ValueError(f"phy2log holds ids outside [0, {num_logical}) (or -1 for an empty slot)")
        # Empty slots get the sentinel id num_logical: they sort after every expert and
        # are dropped from log2phy.
        key = torch.where(phy2log >= 0, phy2log, num_logical)
        counts = torch.zeros(layers, num_logical + 1, dtype=torch.int64).scatter_add_(1, key, torch.ones_like(key))
        logcnt = counts[:, :num_logical].contiguous()
        # A stable sort groups each expert's slots together in slot order; a slot's
        # position inside its group is its replica index.
        sorted_key, order = key.sort(dim=1, stable=True)
        starts = counts.cumsum(1) - counts
        replica = torch.arange(slots).expand(layers, -1) - starts.gather(1, sorted_key)
        most = int(logcnt.max()) if logcnt.numel() else 0
        width = max(most, width or 0, 1)
        log2phy = torch.full((layers, num_logical, width), -1, dtype=torch.int64)
        held = sorted_key < num_logical
        rows = torch.arange(layers).unsqueeze(1).expand(-1, slots)
        log2phy[rows[held], sorted_key[held], replica[held]] = order[held]
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)

    @classmethod
    def initial(cls, num_layers: int, num_slots: int, num_logical: int) -> ExpertMap:
        """The map before any load is known: slot s holds expert s mod num_logical."""
        row = torch.arange(num_slots) % num_logical
        return cls.from_phy2log(row.repeat(num_layers, 1), num_logical)

    def missing(self) -> dict[int, list[int]]:
        """Experts with no slot, per layer that has any (a map to route through has none)."""
        out = {}
        for layer, counts in enumerate(self.logcnt.tolist()):
            gone = [e for e, n in enumerate(counts) if n == 0]
            if gone:
                out[layer] = gone
        return out

    def check_routable(self) -> None:
        """Raise ValueError if some expert has no slot (tokens routed to it would be lost)."""
        missing = self.missing()
        if missing:
            layer, gone = next(iter(missing.items()))
            raise ValueError(f"experts {gone} have no slot in MoE layer {layer} of this placement")

    def layer(self, i: int) -> ExpertMap:
        """The map of MoE layer i alone ([1, ...] tensors)."""
        return ExpertMap(self.phy2log[i:i + 1], self.log2phy[i:i + 1], self.logcnt[i:i + 1])

    def with_layer(self, i: int, row: Tensor | list) -> ExpertMap:
        """This map with layer i's slots replaced by `row`."""
        phy2log = self.phy2log.clone()
        phy2log[i] = torch.as_tensor(row, dtype=torch.int64)
        return ExpertMap.from_phy2log(phy2log, self.num_logical)

    def slots(self, first: int, count: int) -> Tensor:
        """phy2log of slots [first, first + count) of every layer (one rank's share)."""
        return self.phy2log[:, first:first + count]

    def resized(self, num_slots: int) -> ExpertMap:
        """The map over num_slots slots: extra slots are empty, dropped ones forgotten."""
        width = self.num_slots
        if num_slots <= width:
            return ExpertMap.from_phy2log(self.phy2log[:, :num_slots], self.num_logical)
        empty = torch.full((self.num_layers, num_slots - width), -1, dtype=torch.int64)
        return ExpertMap.from_phy2log(torch.cat([self.phy2log, empty], dim=1), self.num_logical)

    @staticmethod
    def concat(parts: list[Tensor], num_logical: int) -> ExpertMap:
        """One map from the phy2log of consecutive ranks' slots."""
        return ExpertMap.from_phy2log(torch.cat(parts, dim=1), num_logical)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertMap) and torch.equal(self.phy2log, other.phy2log)

    __hash__ = None  # type: ignore[assignment]
