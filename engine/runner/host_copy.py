"""Host-to-device copies in the step path that never wait for the device.

A non-blocking copy from pageable host memory is not asynchronous: the driver first
waits for the stream to drain, so every such copy would make the host wait for the step
in flight and expose all host work after it. Staging through pinned memory (torch's
caching host allocator, which holds each block until its copy has completed) keeps the
copy queued behind the running step while the host goes on.
"""

from __future__ import annotations

import numpy as np
import torch


def pinned(a: np.ndarray) -> torch.Tensor:
    """A pinned host copy of `a` (CPU runs: `a` itself, as a tensor)."""
    t = torch.from_numpy(a)
    return t.pin_memory() if torch.cuda.is_available() else t


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """`a` on `device`, copied without blocking the host."""
    if device.type != "cuda":
        return torch.from_numpy(a).to(device)
    return pinned(a).to(device, non_blocking=True)
