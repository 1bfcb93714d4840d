"""Memory every rank of an EP group can write into directly: one buffer per rank,
mapped into every other rank's address space, and a barrier over the group.

The low-latency MoE dispatch (engine/layers/ep_low_latency.py) writes tokens and
expert outputs straight into the peers' buffers and uses the barrier to know the
writes have landed; nothing goes through a collective, so nothing reads a count back
to the host and the whole exchange can sit inside a CUDA graph.

- CUDA: PyTorch symmetric memory (peer mappings over NVLink; the barrier is a device
  kernel on the current stream, capturable in a graph). Multicast is never used.
- CPU: POSIX shared memory (/dev/shm files mapped by every rank process of the host)
  and a gloo barrier. Same layout and the same code above it, so CPU tests check the
  protocol the GPU runs.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist


class PeerMemory(ABC):
    """`nbytes` of memory on every rank of `group`; buffer(r) is rank r's, mapped here."""

    rank: int
    world_size: int
    nbytes: int

    @abstractmethod
    def buffer(self, rank: int) -> torch.Tensor:
        """Rank `rank`'s buffer as a uint8 tensor this process can read and write."""

    @abstractmethod
    def barrier(self) -> None:
        """Returns (on the host, or on the device stream) once every rank reached it;
        writes into peers' buffers made before it are visible after it."""

    @abstractmethod
    def close(self) -> None:
        """Release the mappings (the group must not use them afterwards)."""


def allocate_peer_memory(nbytes: int, device: torch.device, group, timeout_s: float) -> PeerMemory:
    if device.type == "cuda":
        return SymmetricPeerMemory(nbytes, device, group, timeout_s)
    return SharedHostPeerMemory(nbytes, group)


class SymmetricPeerMemory(PeerMemory):
    def __init__(self, nbytes: int, device: torch.device, group, timeout_s: float) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")    # peer writes only
        group = group or dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.nbytes = nbytes
        self._local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self._handle = symm_mem.rendezvous(self._local, group)
        self._buffers = [self._handle.get_buffer(r, (nbytes,), torch.uint8, 0) for r in range(self.world_size)]
        # A rank that died mid-exchange would leave the others spinning in the barrier
        # kernel; the timeout turns that into an error (the CUDA context is then lost).
        self._timeout_ms = int(timeout_s * 1000)

    def buffer(self, rank: int) -> torch.Tensor:
        return self._buffers[rank]

    def barrier(self) -> None:
        self._handle.barrier(channel=0, timeout_ms=self._timeout_ms)

    def close(self) -> None:
        self._buffers, self._handle, self._local = [], None, None


class SharedHostPeerMemory(PeerMemory):
    def __init__(self, nbytes: int, group) -> None:
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.nbytes = nbytes
        token = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=group)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = lambda r: os.path.join(folder, f"tandem-ep-{token[0]}-{r}")  # noqa: E731
        own = path(self.rank)
        with open(own, "wb") as f:
            f.truncate(nbytes)
        try:
            dist.barrier(group=group)
            self._buffers = [torch.from_file(path(r), shared=True, size=nbytes, dtype=torch.uint8)
                             for r in range(self.world_size)]
            dist.barrier(group=group)
        finally:
            os.unlink(own)      # the mappings stay; nothing is left behind if a rank dies

    def buffer(self, rank: int) -> torch.Tensor:
        return self._buffers[rank]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        self._buffers = []
