"""A benchmark's results as JSON lines: each record printed, and appended to the file
the run names (`--out`), so a device run's figures come back whole."""

from __future__ import annotations

import json
from pathlib import Path

_out: Path | None = None


def record_to(path: str | Path | None) -> None:
    global _out
    _out = Path(path) if path else None


def emit(**rec) -> None:
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    if _out is not None:
        with _out.open("a") as f:
            f.write(line + "\n")
