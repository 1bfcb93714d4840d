"""A prefill engine in its own process, driven over a pipe (so a test can kill it)."""

from __future__ import annotations

import os
import sys


def serve_prefills(conn) -> None:
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("TANDEM_CACHE", os.path.join(os.getcwd(), ".cache", "tandem-test"))
    from tests.disagg.handoff import make_core, prefill
    core = make_core(connector_args={"lease_s": 60.0})
    conn.send("ready")
    n = 0
    while True:
        kind, prompt = conn.recv()
        n += 1
        first, params = prefill(core, f"{kind}-{n}", prompt)
        conn.send((first, params["handle"]))
        if kind == "ok":
            # Serve the consumer's notices until it is done reading.
            while core.scheduler.held and not conn.poll(0.01):
                core.step()
