"""The torch.distributed groups of one EP generation.

Every change of the EP world (start, grow, shrink, a lost rank) is a new generation:
ranks leave the old default group and form a new one through the coordinator's
TCPStore under a per-generation key prefix, so stale keys never mix. Two groups per
generation: the default group carries the MoE dispatch/combine collectives and the
load all-reduce; a second one carries expert-weight migration, whose point-to-point
transfers run while forwards issue their own collectives. A third, under a name no
earlier generation used, maps the low-latency dispatch's peer memory (see peer_group).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class EPGroups:
    generation: int
    rank: int
    world_size: int
    dispatch: object        # ProcessGroup (the default group)
    migration: object       # ProcessGroup
    peer: object            # ProcessGroup with a generation-unique name (peer memory)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def join_generation(host: str, port: int, generation: int, rank: int, world_size: int, backend: str,
                    timeout_s: float) -> EPGroups:
    leave_group()
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"tandem-ep/{generation}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)
    migration = dist.new_group(backend=backend, timeout=timeout)
    if backend == "nccl":
        # Build the migration communicator now, while every rank is here: NCCL creates
        # communicators at their first operation, and batched point-to-point needs every
        # rank of the group at the first one (a rank with nothing to move would not come).
        probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(probe, group=migration)
        torch.cuda.current_stream().synchronize()
    return EPGroups(generation, rank, world_size, dist.group.WORLD, migration,
                    peer_group(generation, backend, timeout))


# Group names count from 0 again in every generation (destroy_process_group resets the
# count), but PyTorch's symmetric memory numbers its rendezvous per group name inside
# each process: a rank started for generation g would count from 0 where the running
# ranks count on from their earlier rendezvous under the same name, and never meet them.
# A name no earlier generation used gives every rank a fresh count.
_NAMES_PER_GENERATION = 1000


def peer_group(generation: int, backend: str, timeout: timedelta):
    """A group over the whole generation under a name unique to `generation` (the same on
    every rank: every rank creates its groups in the same order)."""
    c10d = dist.distributed_c10d
    c10d._world.group_count = max(c10d._world.group_count, _NAMES_PER_GENERATION * (generation + 1))
    return dist.new_group(backend=backend, timeout=timeout)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
