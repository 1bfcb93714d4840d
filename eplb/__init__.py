"""EPLB: expert-load balancing for wide expert parallelism.

The placement policy: `rebalance` turns per-expert load into expert maps,
`balancedness` scores a placement against a load, `contiguous_placement` is the
load-oblivious baseline. Serving: `ElasticEPEngine` (an EP engine that aggregates load
statistics, migrates expert weights layer by layer and grows or shrinks its world),
with `EplbStats` for its metrics.
"""

from eplb.placement import Placement, balancedness, contiguous_placement, gpu_loads
from eplb.policy import rebalance

__all__ = ["Placement", "balancedness", "contiguous_placement", "gpu_loads", "rebalance"]
