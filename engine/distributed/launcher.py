"""How an EP engine starts its rank processes. The default spawns local processes;
`cluster/` places them as Ray actors in a placement group. A launched rank is anything
with `is_alive()`, `join(timeout)` and `kill()`."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Protocol

from engine.distributed.ep_worker import worker_main


class RankLauncher(Protocol):
    # True when each rank sees only its own GPU (as cuda:0), as under Ray.
    isolated_devices: bool

    def launch(self, names: list[str], address: str, threads: int) -> list[Any]:
        """Start one rank process per name, connecting to the coordinator at `address`."""

    def close(self) -> None:
        """Release what the launcher holds (the engine has stopped its ranks)."""


class SpawnLauncher:
    """Ranks as local spawned processes that exit when the coordinator process does."""
    isolated_devices = False

    def __init__(self) -> None:
        self._mp = mp.get_context("spawn")

    def launch(self, names: list[str], address: str, threads: int) -> list[Any]:
        procs = []
        for name in names:
            proc = self._mp.Process(target=worker_main, args=(address, name, threads, os.getpid()),
                                    daemon=True, name=f"tandem-ep-{name}")
            proc.start()
            procs.append(proc)
        return procs

    def close(self) -> None:
        """Nothing to release: the engine has joined (or killed) its processes."""
