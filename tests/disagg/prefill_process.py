"""A prefill engine in its own process, driven over a pipe (so a test can kill it)."""

from __future__ import annotations

import os
import sys


def serve_prefills(conn, model: str = "default") -> None:
    """Answers (kind, prompt) with (first token, handle); ("pools", None) with whether
    its block pool and state slots are all free (nothing held)."""
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("TANDEM_CACHE", os.path.join(os.getcwd(), ".cache", "tandem-test"))
    from tests.disagg.handoff import make_core, pool_is_full, prefill
    core = make_core(model, connector_args={"lease_s": 60.0})
    conn.send("ready")
    n = 0
    while True:
        kind, prompt = conn.recv()
        if kind == "pools":
            core.step()         # take any last notices
            conn.send(pool_is_full(core) and not core.scheduler.held)
            continue
        n += 1
        first, params = prefill(core, f"{kind}-{n}", prompt)
        conn.send((first, params.handle))
        if kind == "ok":
            # Serve the consumer's notices until it is done reading.
            while core.scheduler.held and not conn.poll(0.01):
                core.step()


def serve_prefill_service(conn) -> None:
    """A prefill AsyncEngine behind a PrefillService; sends its address, then serves."""
    sys.path.insert(0, os.getcwd())
    import asyncio

    from disagg.connector import connector_spec
    from disagg.prefill_service import PrefillService
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    async def main() -> None:
        engine = AsyncEngine(EngineConfig(max_model_len=256, max_num_seqs=4),
                             kv_transfer=connector_spec())
        service = PrefillService(engine)
        conn.send(service.address)
        await service.serve_forever()
    asyncio.run(main())
