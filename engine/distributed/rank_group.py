"""The transport of an EP engine: its rank processes, the pyzmq socket they answer on,
the TCPStore their torch.distributed groups form through, and generations.

`RankGroup` starts ranks (through a launcher: local processes, or Ray actors from
cluster/), sends each one message at a time and gathers the answers, forms the next
generation (a new torch.distributed group over a new rank list and expert map) and
stops ranks. It knows nothing of requests (engine/distributed/request_tracker.py).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import zmq

from engine.config import EngineConfig
from engine.distributed.launcher import RankLauncher, SpawnLauncher
from engine.distributed.protocol import (AddRequest, Error, Init, Message, Ready, Regroup, RegroupDone, Reset, Shutdown,
                                         pack, unpack)
from engine.layers.expert_map import ExpertMap


class EPEngineError(RuntimeError):
    """The EP engine cannot go on; it refuses further work."""


class RanksDied(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"ranks {names} died")
        self.names = names


class RankFailed(RuntimeError):
    """A rank answered a message with an error."""


@dataclass
class Rank:
    name: str
    process: Any                  # is_alive(), join(timeout), kill()
    device: str = ""
    slot_experts: list[int] = field(default_factory=list)   # the expert of each slot it loaded at start
    pending_add: list[AddRequest] = field(default_factory=list)
    pending_abort: list[str] = field(default_factory=list)


class RankGroup:
    def __init__(self, config: EngineConfig, *, host: str, launcher: RankLauncher | None, timeout_s: float,
                 start_timeout_s: float, worker_threads: int) -> None:
        self.config = config
        self.host = host
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.worker_threads = worker_threads
        self.launcher = launcher or SpawnLauncher()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.store = dist.TCPStore(host, 0, None, True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
        self._inbox: dict[str, deque] = {}
        self._seq = 0
        self._expect: dict[str, int] = {}
        self._names = (f"rank-{i}" for i in itertools.count())
        self.known: dict[str, Rank] = {}     # every started, not yet retired rank process
        self.ranks: list[Rank] = []          # the current generation, in rank order
        self.generation = -1
        self.events: list[str] = []          # what happened to the rank set, in words
        self.graph_sizes: dict[str, list[int]] = {}   # per rank: decode batch sizes it replays as graphs
        self._closed = False

    def __len__(self) -> int:
        return len(self.ranks)

    def names(self) -> list[str]:
        return [r.name for r in self.ranks]

    # -- messages -------------------------------------------------------------------------
    def send(self, name: str, msg: Message) -> None:
        # Each answer echoes its message's seq: answers to messages a failure left
        # behind are told apart from the answer awaited now, and dropped.
        self._seq += 1
        self._expect[name] = self._seq
        self._sock.send_multipart([name.encode(), pack(msg, self._seq)])

    def gather(self, names: list[str], allow_errors: bool = False, while_waiting: Callable[[], bool] | None = None,
               timeout_s: float | None = None) -> dict[str, Message]:
        """One answer from each of `names`. while_waiting() is called between polls (the
        engine steps the current ranks while new ones load); it returns whether it did
        anything. Raises RanksDied if one of them exits, RankFailed on an Error answer
        unless allow_errors."""
        want = set(names)
        got: dict[str, Message] = {}
        # Collectives time out after timeout_s inside the ranks, which then answer with
        # the error; give them that long and more before counting a rank as hung.
        limit = timeout_s or 2 * self.timeout_s + 5
        deadline = time.monotonic() + limit
        while want - got.keys():
            for n in list(want - got.keys()):
                box = self._inbox.get(n)
                while box and n not in got:
                    msg, seq = box.popleft()
                    if seq == self._expect.get(n):
                        got[n] = msg
            if not want - got.keys():
                break
            if while_waiting is not None and not (want & set(self.names())) and while_waiting():
                continue
            if self._sock.poll(200):
                name, data = self._sock.recv_multipart()
                self._inbox.setdefault(name.decode(), deque()).append(unpack(data))
                continue
            dead = [n for n in want - got.keys() if n in self.known and not self.known[n].process.is_alive()]
            dead += [r.name for r in self.ranks if not r.process.is_alive() and r.name not in dead]
            if dead:
                raise RanksDied(sorted(set(dead)))
            if time.monotonic() > deadline:
                raise EPEngineError(f"no answer from {sorted(want - got.keys())} within {limit:.0f} s; "
                                    f"a rank hangs, restart the engine")
        for n, a in got.items():
            if isinstance(a, Error) and not allow_errors:
                raise RankFailed(f"{n}: {a.error}\n{a.traceback}")
        return got

    def check_alive(self) -> None:
        dead = [r.name for r in self.ranks if not r.process.is_alive()]
        if dead:
            raise RanksDied(dead)

    # -- rank processes and generations ------------------------------------------------------
    def spawn(self, count: int, init_for: Callable[[int], Init], while_waiting: Callable[[], bool] | None
              ) -> tuple[list[Rank], Ready]:
        """Start `count` rank processes; init_for(k) is the k-th one's Init. Waits until
        each has loaded the model (calling while_waiting meanwhile). On failure the new
        ranks are stopped and EPEngineError raised; the current group is untouched."""
        names = [next(self._names) for _ in range(count)]
        try:
            procs = self.launcher.launch(names, self.address, self.worker_threads)
        except Exception as e:
            raise EPEngineError(f"new ranks {names} did not start: {e}") from e
        new = [Rank(name, proc) for name, proc in zip(names, procs)]
        for r in new:
            self.known[r.name] = r
        try:
            self.gather(names, while_waiting=while_waiting, timeout_s=self.start_timeout_s)      # hello
            for k, r in enumerate(new):
                self.send(r.name, replace(init_for(k), config=Init.config_to_wire(self.rank_config(r))))
            ready = self.gather(names, while_waiting=while_waiting, timeout_s=self.start_timeout_s)
        except (RanksDied, RankFailed, EPEngineError) as e:    # the running ranks are untouched
            self.retire(names)
            raise EPEngineError(f"new ranks {names} did not start: {e}") from e
        return new, ready[names[0]]

    def rank_config(self, rank: Rank) -> EngineConfig:
        """A rank's engine settings: its own GPU, and no CUDA graphs at start-up (the
        graphs need the group: the low-latency dispatch captures them at each regroup,
        the normal one reads receive counts on the host, which a graph cannot replay)."""
        changes: dict[str, Any] = {}
        if self.config.device.startswith("cuda") and self.launcher.isolated_devices:
            rank.device = changes["device"] = "cuda:0"     # the one GPU this rank sees
        elif self.config.device.startswith("cuda"):
            used = {r.device for r in self.known.values() if r is not rank}
            rank.device = next(f"cuda:{i}" for i in range(len(self.known) + 1) if f"cuda:{i}" not in used)
            changes["device"] = rank.device
        if getattr(self.config, "enable_cuda_graphs", None):
            changes["enable_cuda_graphs"] = False
        return replace(self.config, **changes)

    def regroup(self, ranks: list[Rank], expert_map: ExpertMap, slots_per_rank: int, *, dispatch: str,
                cuda_graphs: bool, weights: dict[str, str] | None = None, ext: dict[str, Any] | None = None) -> None:
        """Form the next generation from `ranks` (in rank order) with `expert_map`;
        weights says, per new rank, where its slots' weights come from: 'model' (its own
        loaded checkpoint) or 'none' (migration); the others keep theirs."""
        if expert_map.num_slots != len(ranks) * slots_per_rank:
            raise ValueError(f"the expert map has {expert_map.num_slots} slots, {len(ranks)} ranks of "
                             f"{slots_per_rank} slots need {len(ranks) * slots_per_rank}")
        self.generation += 1
        phy2log = expert_map.phy2log.tolist()
        for i, r in enumerate(ranks):
            self.send(r.name, Regroup(self.generation, i, len(ranks), slots_per_rank, phy2log,
                                      (weights or {}).get(r.name, "keep"), dispatch, cuda_graphs, dict(ext or {})))
        answers = self.gather([r.name for r in ranks])
        self.graph_sizes.clear()
        self.graph_sizes.update({n: a.graph_sizes for n, a in answers.items() if isinstance(a, RegroupDone)})
        self.ranks[:] = ranks
        self.events.append(f"generation {self.generation}: {len(ranks)} ranks")

    def retire(self, names: list[str]) -> None:
        """Stop rank processes that are no longer in the group."""
        for n in names:
            if self.known[n].process.is_alive():
                self.send(n, Shutdown())
        deadline = time.monotonic() + 30
        for n in names:
            r = self.known.pop(n)
            r.process.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                r.process.kill()
            self._inbox.pop(n, None)

    def drop_lost(self, lost: list[str]) -> tuple[list[Rank], list[torch.Tensor]]:
        """After ranks died: the survivors drop their requests and say which expert each
        of their slots holds (their own maps are the truth: a commit may have landed in
        the failed step); the dead are forgotten. Returns (survivors, their phy2log
        [moe layers, slots] each)."""
        survivors = [r for r in self.ranks if r.name not in lost]
        for r in survivors:
            self.send(r.name, Reset())
        held = self.gather([r.name for r in survivors]) if survivors else {}
        for n in lost:
            self.known.pop(n).process.join(1)
            self._inbox.pop(n, None)
        return survivors, [torch.tensor(held[r.name].local_phy2log, dtype=torch.long) for r in survivors]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for r in self.known.values():
            if r.process.is_alive():
                self.send(r.name, Shutdown())
        for r in self.known.values():
            r.process.join(10)
            if r.process.is_alive():
                r.process.kill()
        self.known = {}
        self.ranks.clear()
        self.launcher.close()
        self._sock.close()
        self._ctx.term()
