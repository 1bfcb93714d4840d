"""Schemathesis, a third-party fuzzer, against the served OpenAPI schema with every
check on: generated requests (valid and invalid) at every route, the generation routes
reaching the engine with the real model name (the schema names it), 0 server errors,
every status and body as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.reliability.conftest import APP_ARGS, REPORT

EXAMPLES = int(os.environ.get("TANDEM_SCHEMATHESIS_EXAMPLES", "25"))


def test_schemathesis_finds_nothing(cluster, tmp_path):
    report = tmp_path / "report.json"
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{cluster}/openapi.json",
           "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", "1", "--request-timeout", "120",
           "--phases", "examples,coverage,fuzzing", "--generation-database", "none",
           "--report", "json", "--report-json-path", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(Path(__file__).parents[2]),
                               "SCHEMATHESIS_HOOKS": "tests.reliability.schemathesis_hooks",
                               "TANDEM_TEST_MAX_MODEL_LEN": str(APP_ARGS["engine"]["max_model_len"])})
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    cases = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert cases, proc.stdout[-2000:]
    REPORT.sent += int(cases[1])
    REPORT.notes.append(f"schemathesis ({EXAMPLES} examples per operation, every check): "
                        f"{cases[1]} test cases, {cases[2]} passed")
