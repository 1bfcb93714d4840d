"""A multi-rank engine: attention data-parallel, MoE expert-parallel, one process per
rank, driven step by step from a coordinator over pyzmq (msgpack messages).

`EPEngine` is the coordinator; `ep_worker` is what each rank process runs.
"""

from engine.distributed.ep_engine import EPEngine, EPEngineError, RankLostError

__all__ = ["EPEngine", "EPEngineError", "RankLostError"]
