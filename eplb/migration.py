"""Moving one MoE layer's expert weights to a new placement while the engine serves.

`start()` posts the point-to-point transfers (one packed message per rank pair:
each expert's w13 and w2 rows side by side) into a staging buffer and returns at
once; forwards keep running on the old weights and map meanwhile (the transfers use
their own process group). `commit()`, between two steps, waits for them, writes the
staged and locally copied experts into the live weights and swaps the layer's map.
Nothing live is written before commit, so a failed transfer leaves the layer intact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.layers.expert_map import ExpertMap
from eplb.transfer_plan import Transfer


def _rows(moe: nn.Module, slots: list[int]) -> torch.Tensor:
    """Experts of local `slots` packed as [n, w13 numel + w2 numel] (a copy)."""
    idx = torch.tensor(slots, dtype=torch.long, device=moe.w13.device)
    return torch.cat([moe.w13.data.index_select(0, idx).flatten(1),
                      moe.w2.data.index_select(0, idx).flatten(1)], dim=1).contiguous()


class LayerMigration:
    def __init__(self, moe: nn.Module, new_row: list[int], transfers: list[Transfer], rank: int, group=None) -> None:
        self.moe, self.new_row, self.group, self.rank = moe, new_row, group, rank
        self.local = [(t.src_slot, t.dst_slot) for t in transfers if t.is_local and t.dst_rank == rank]
        self.sends: dict[int, list[int]] = {}
        self.recvs: dict[int, list[int]] = {}
        for t in transfers:     # transfers come in destination-slot order on every rank
            if t.is_local:
                continue
            if t.src_rank == rank:
                self.sends.setdefault(t.dst_rank, []).append(t.src_slot)
            if t.dst_rank == rank:
                self.recvs.setdefault(t.src_rank, []).append(t.dst_slot)
        self.bytes_sent = 0
        self._works: list = []
        self._staged: list[tuple[list[int], torch.Tensor]] = []

    def start(self) -> None:
        # One batch of every send and receive (NCCL: one group call on the migration
        # group's communicator). Unbatched NCCL sends block until the peer's matching
        # receive runs, and the peer's receive queues behind its own send on the same
        # stream; each unbatched pair also built a fresh 2-rank communicator mid-serving.
        ops = []
        for dst, slots in sorted(self.sends.items()):
            buf = _rows(self.moe, slots)
            self.bytes_sent += buf.numel() * buf.element_size()
            ops.append(dist.P2POp(dist.isend, buf, dst, group=self.group))
        width = self.moe.w13[0].numel() + self.moe.w2[0].numel()
        for src, slots in sorted(self.recvs.items()):
            buf = self.moe.w13.new_empty(len(slots), width)
            ops.append(dist.P2POp(dist.irecv, buf, src, group=self.group))
            self._staged.append((slots, buf))
        if ops:
            # The buffers stay referenced (ops, _staged) until commit has waited: NCCL
            # reads and writes them on its own stream after start() returns.
            self._works = [(work, ops) for work in dist.batch_isend_irecv(ops)]

    @torch.no_grad()
    def commit(self) -> None:
        for work, _ in self._works:
            work.wait()     # NCCL: orders the current stream after the transfers
        w13, w2 = self.moe.w13.data, self.moe.w2.data
        n13 = w13[0].numel()
        if self.local:      # read every source before writing any destination
            src = _rows(self.moe, [s for s, _ in self.local])
            self._staged.append(([d for _, d in self.local], src))
        for slots, buf in self._staged:
            idx = torch.tensor(slots, dtype=torch.long, device=w13.device)
            w13.index_copy_(0, idx, buf[:, :n13].view(len(slots), *w13.shape[1:]))
            w2.index_copy_(0, idx, buf[:, n13:].view(len(slots), *w2.shape[1:]))
        self.moe.set_expert_map(ExpertMap.from_phy2log([self.new_row], self.moe.num_experts))
        self._works, self._staged = [], []
