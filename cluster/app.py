"""The Ray Serve application, built from one settings dict (`build_app(args)`).

Two layers of deployments: the router (the HTTP ingress, cluster/router.py) in front
of the engine pools (cluster/pools.py): one colocated pool, or a prefill pool feeding
a decode pool ("pd").
"""

from __future__ import annotations

from cluster.pools import build_pools
from cluster.router import router_deployment
from cluster.settings import parse_settings


def build_app(args: dict | None = None):
    settings = parse_settings(args)
    return router_deployment(settings).bind(settings, build_pools(settings))
