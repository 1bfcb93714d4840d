"""An engine that dies inside a served replica (a step fails, no request to blame):
its streams go on from the other replica, exactly; its replica's health check fails,
so Serve replaces it; nothing is lost and no block leaks.

A second application ("faulty", under /faulty) runs beside the suite's: its decode
pool's runtime_env puts tests/reliability/fault_site first on PYTHONPATH, whose
sitecustomize installs tests/reliability/faults.py, which makes one decode engine's
30th step raise."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from tests.reliability.conftest import APP_ARGS, REPORT, complete, stream_completion

REPO = Path(__file__).resolve().parents[2]


def decode_replicas(app: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#Decode#")}


def test_a_dead_engine_is_replaced_and_its_streams_resume(cluster, tmp_path):
    from cluster.app import build_app

    args = json.loads(json.dumps(APP_ARGS))
    args["pools"]["decode"]["runtime_env"] = {"env_vars": {
        "PYTHONPATH": f"{REPO / 'tests' / 'reliability' / 'fault_site'}:{REPO}",
        "TANDEM_TEST_FAULT_MARKER": str(tmp_path / "failed"), "TANDEM_TEST_FAULT_AFTER_STEPS": "30"}}
    bodies = [{"prompt": f"engine death {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
              for i in range(6)]
    refs = [complete(cluster, **b).json()["choices"][0]["text"] for b in bodies]
    serve.run(build_app(args), name="faulty", route_prefix="/faulty", blocking=False)
    url = f"{cluster}/faulty"
    try:
        deadline = time.monotonic() + 180
        while complete(url, "up?", max_tokens=1).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(1)
        before = decode_replicas("faulty")

        async def main():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*[stream_completion(client, url, b) for b in bodies])
        results = asyncio.run(main())
        assert (tmp_path / "failed").exists()        # the fault did fire
        for r in results:
            REPORT.failed += not (r["done"] and r["error"] is None)
            assert r["status"] == 200 and r["done"] and r["error"] is None, r
        assert [r["text"] for r in results] == refs
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        resumed = sum(float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines()
                      if x.startswith("tandem_requests_resumed_total"))
        assert resumed >= 1
        REPORT.resumed += int(resumed)
        deadline = time.monotonic() + 120      # Serve's health check finds the dead engine
        while not (before - decode_replicas("faulty")) or len(decode_replicas("faulty")) < 2:
            assert time.monotonic() < deadline, (before, decode_replicas("faulty"))
            time.sleep(1)
        assert complete(url, "after", max_tokens=4).status_code == 200
        REPORT.notes.append(f"engine death: {len(bodies)} streams all completed exactly, {int(resumed)} resumed, "
                            f"the dead replica replaced by Serve's health check")
    finally:
        serve.delete("faulty")
