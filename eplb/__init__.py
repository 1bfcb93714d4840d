"""EPLB: expert-load balancing for wide expert parallelism.

The placement policy: `rebalance` turns per-expert load into expert maps,
`balancedness` scores a placement against a load, `contiguous_placement` is the
load-oblivious baseline. Serving: `eplb.controller.EplbController`, a plug-in of the
EP engine that aggregates load statistics (`load_stats`), plans and migrates expert
weights layer by layer (`planner`, `transfer_plan`, `migration`, in the ranks through
`worker_extension`; its messages in `messages`); `eplb.elastic` grows or shrinks the
world (`ElasticEPEngine`: the engine with both); `eplb.metrics.EplbStats` holds the
metrics. Importing eplb registers `eplb.engine_factory` with the engine, so
`LLM(..., enable_eplb=True)` builds that engine.
"""

import eplb.engine_factory  # noqa: F401  (registers the EPLB engine client)
from eplb.placement import Placement, balancedness, contiguous_placement, gpu_loads
from eplb.policy import rebalance

__all__ = ["Placement", "balancedness", "contiguous_placement", "gpu_loads", "rebalance"]
