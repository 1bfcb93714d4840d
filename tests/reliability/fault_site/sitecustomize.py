"""Python imports this at start-up in processes whose PYTHONPATH names this folder: the
fault suite gives it to one pool's replicas (through their runtime_env) so that their
engines carry the fault of tests/reliability/faults.py."""

import os

if os.environ.get("TANDEM_TEST_FAULT_MARKER"):
    from tests.reliability.faults import fail_one_engine_once

    fail_one_engine_once()
