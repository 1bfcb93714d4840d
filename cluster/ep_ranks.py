"""EP ranks as Ray actors in placement groups: the Ray-side `RankLauncher` for the
expert-parallel engine (`engine.distributed.EPEngine`, `eplb.elastic.ElasticEPEngine`).

Inside a Serve replica the initial ranks go into the replica's own placement group
(Serve's `placement_group_bundles`: bundle 0 is the replica actor's, bundles 1.. one rank
each), so Ray places, restarts and retires the replica and its ranks together. Ranks a
scale-up adds get a placement group of their own, shaped like the replica's rank
bundles, which is removed when the last of them retires; a bundle of the replica's group
that a rank left is used again first. Outside a placement group (a script), each batch
of ranks gets a group of its own. Each rank is an actor in its bundle running the same
worker loop as a local rank process; Ray gives it its own GPU, which it sees as cuda:0.
The coordinator must be reachable from the actors: pass the engine `host=` the node IP.
"""

from __future__ import annotations

import ray
from ray.util import get_current_placement_group
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class NotEnoughResources(RuntimeError):
    """The cluster cannot place the ranks asked for; nothing was started."""


@ray.remote
class _RankActor:
    def serve(self, address: str, name: str, threads: int) -> None:
        from engine.distributed.ep_worker import worker_main
        worker_main(address, name, threads)     # returns when the coordinator says shutdown


class _ActorRank:
    """What the engine needs of a rank process, for an actor running the worker loop.
    Once the engine has seen it end (join or kill), its bundle goes back to the launcher."""

    def __init__(self, actor, done: ray.ObjectRef, release) -> None:
        self.actor, self.done, self._release = actor, done, release

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def join(self, timeout: float | None = None) -> None:
        ready, _ = ray.wait([self.done], timeout=timeout)
        if ready:
            self._released()

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)
        self._released()

    def _released(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release(self)


Slot = tuple[PlacementGroup, int]      # a placement group and one of its bundle indices


class RayRankLauncher:
    isolated_devices = True

    def __init__(self, num_gpus_per_rank: float = 0, num_cpus_per_rank: float = 1,
                 strategy: str = "PACK", ready_timeout_s: float = 600) -> None:
        """The bundle arguments shape the ranks' groups outside a replica's group; in one,
        new groups copy its rank bundles (custom resources that pin a pool included)."""
        self.home = get_current_placement_group()
        if self.home is not None and len(self.home.bundle_specs) > 1:
            self.bundle = dict(self.home.bundle_specs[1])
            self._free: list[Slot] = [(self.home, i) for i in range(1, len(self.home.bundle_specs))]
        else:
            self.home = None
            self.bundle = {"CPU": num_cpus_per_rank, **({"GPU": num_gpus_per_rank} if num_gpus_per_rank else {})}
            self._free = []
        self.strategy, self.ready_timeout_s = strategy, ready_timeout_s
        self._reserved: list[Slot] = []
        self._slots: dict[int, Slot] = {}                      # id(rank) -> its bundle
        self._owned: dict[bytes, tuple[PlacementGroup, set[int]]] = {}   # groups made here -> ranks in them

    @property
    def groups(self) -> list[PlacementGroup]:
        """The placement groups this launcher made and still holds (not the replica's)."""
        return [pg for pg, _ in self._owned.values()]

    def reserve(self, count: int, timeout_s: float | None = None) -> None:
        """Make sure `count` more ranks can be placed (free bundles of the replica's group,
        else a new group), before the engine is touched; NotEnoughResources if the
        cluster cannot place them within `timeout_s`."""
        need = count - len(self._free) - len(self._reserved)
        total = ray.cluster_resources()
        short = {k: v * need for k, v in self.bundle.items() if v * need > total.get(k, 0)}
        if need > 0 and short:      # more than the whole cluster has: no use waiting
            raise NotEnoughResources(f"the cluster cannot place {need} more EP ranks of {self.bundle} each: "
                                     f"they need {short} and the cluster has "
                                     f"{ {k: total.get(k, 0) for k in short} } in all; add nodes or ask for "
                                     f"fewer ranks")
        if need > 0:
            self._reserved += self._new_group(need, self.ready_timeout_s if timeout_s is None else timeout_s)

    def cancel_reservation(self) -> None:
        """Give back reserved bundles no rank took (a scale that was refused or failed)."""
        reserved, self._reserved = self._reserved, []
        for pg in {pg.id.binary(): pg for pg, _ in reserved}.values():
            if pg.id.binary() in self._owned and not self._owned[pg.id.binary()][1]:
                self._remove(pg)

    def _new_group(self, count: int, timeout_s: float) -> list[Slot]:
        pg = placement_group([dict(self.bundle) for _ in range(count)], strategy=self.strategy)
        if not pg.wait(timeout_s):
            remove_placement_group(pg)
            raise NotEnoughResources(f"the cluster cannot place {count} more EP ranks of {self.bundle} each "
                                     f"({self.strategy}) within {timeout_s:.0f} s; add nodes or resources, "
                                     f"or ask for fewer ranks")
        self._owned[pg.id.binary()] = (pg, set())
        return [(pg, i) for i in range(count)]

    def launch(self, names: list[str], address: str, threads: int) -> list[_ActorRank]:
        slots = []
        while len(slots) < len(names) and (self._free or self._reserved):
            slots.append((self._free or self._reserved).pop(0))
        if len(slots) < len(names):
            slots += self._new_group(len(names) - len(slots), self.ready_timeout_s)
        ranks = []
        for name, (pg, index) in zip(names, slots):
            actor = _RankActor.options(
                name=None, num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
            ).remote()
            rank = _ActorRank(actor, actor.serve.remote(address, name, threads), self._release)
            self._slots[id(rank)] = (pg, index)
            if pg.id.binary() in self._owned:
                self._owned[pg.id.binary()][1].add(id(rank))
            ranks.append(rank)
        return ranks

    def _release(self, rank: _ActorRank) -> None:
        """A rank ended: its actor goes (so the bundle's resources are free again); a
        bundle of the replica's group is kept for the next rank, a group made here is
        removed with its last rank."""
        ray.kill(rank.actor, no_restart=True)
        pg, index = self._slots.pop(id(rank))
        owned = self._owned.get(pg.id.binary())
        if owned is None:
            self._free.append((pg, index))
            self._free.sort(key=lambda slot: slot[1])
            return
        owned[1].discard(id(rank))
        if not owned[1] and not any(p.id == pg.id for p, _ in self._reserved):
            self._remove(pg)

    def _remove(self, pg: PlacementGroup) -> None:
        self._owned.pop(pg.id.binary(), None)
        remove_placement_group(pg)

    def close(self) -> None:
        self._reserved = []
        for pg in self.groups:
            self._remove(pg)
