"""A real engine failure inside a served replica, for the fault suite.

`fail_one_engine_once` runs at start-up in the replicas of one pool (fault_site/
sitecustomize.py, put on their PYTHONPATH by the pool's runtime_env); it wraps `EngineCore.step` so that the first process to
reach step N (a marker file decides, across processes) raises there, as a fault no
request explains would. Nothing in the served code knows of it."""

from __future__ import annotations

import os


def fail_one_engine_once() -> None:
    from engine.core.engine_core import EngineCore

    marker = os.environ["TANDEM_TEST_FAULT_MARKER"]
    after = int(os.environ.get("TANDEM_TEST_FAULT_AFTER_STEPS", "30"))
    original = EngineCore.step
    calls = [0]

    def step(self):
        calls[0] += 1
        if calls[0] == after:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:     # another replica already failed
                return original(self)
            raise RuntimeError("injected fault: the engine step failed")
        return original(self)

    EngineCore.step = step
