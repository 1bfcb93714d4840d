"""EP ranks as Ray actors in a placement group: the Ray-side `RankLauncher` for the
expert-parallel engine (`engine.distributed.EPEngine`, `eplb.elastic.ElasticEPEngine`).

Each batch of ranks the engine starts (the initial world, or the ranks a scale-up adds)
gets one placement group with a bundle per rank, packed onto as few nodes as possible
so the all-to-alls stay on NVLink. Each rank is an actor in its bundle running the same
worker loop as a local rank process; Ray gives it its own GPU, which it sees as cuda:0.
The coordinator must be reachable from the actors: pass `host=` the driver node's IP.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote
class _RankActor:
    def serve(self, address: str, name: str, threads: int) -> None:
        from engine.distributed.ep_worker import worker_main
        worker_main(address, name, threads)     # returns when the coordinator says shutdown


class _ActorRank:
    """What the engine needs of a rank process, for an actor running the worker loop."""

    def __init__(self, actor, done: ray.ObjectRef) -> None:
        self.actor, self.done = actor, done

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def join(self, timeout: float | None = None) -> None:
        ray.wait([self.done], timeout=timeout)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RayRankLauncher:
    isolated_devices = True

    def __init__(self, num_gpus_per_rank: float = 0, num_cpus_per_rank: float = 1,
                 strategy: str = "PACK", ready_timeout_s: float = 600) -> None:
        self.bundle = {"CPU": num_cpus_per_rank, **({"GPU": num_gpus_per_rank} if num_gpus_per_rank else {})}
        self.strategy, self.ready_timeout_s = strategy, ready_timeout_s
        self.groups: list[PlacementGroup] = []

    def launch(self, names: list[str], address: str, threads: int) -> list[_ActorRank]:
        pg = placement_group([dict(self.bundle) for _ in names], strategy=self.strategy)
        if not pg.wait(self.ready_timeout_s):
            remove_placement_group(pg)
            raise RuntimeError(f"the cluster cannot place {len(names)} EP ranks of {self.bundle} "
                               f"({self.strategy}) within {self.ready_timeout_s} s")
        self.groups.append(pg)
        ranks = []
        for i, name in enumerate(names):
            actor = _RankActor.options(
                name=None, num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            ranks.append(_ActorRank(actor, actor.serve.remote(address, name, threads)))
        return ranks

    def close(self) -> None:
        for pg in self.groups:
            remove_placement_group(pg)
        self.groups = []
