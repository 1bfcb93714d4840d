"""Triton kernels behind the dispatcher functions of engine/ops and engine/runner/inputs.

One kernel family per module. Modules here import triton at import time, so the
dispatchers import them lazily: a CPU-only install without triton still runs the
torch references.

Which implementation runs:
- CUDA tensors: Triton (unless the backend is forced to "torch").
- CPU tensors: the torch reference, unless the backend is forced to "triton", which
  needs TRITON_INTERPRET=1 (the Triton interpreter; that is how CI tests the kernels).
The backend is forced per call (`backend=` argument of a dispatcher), for a region
(`with kernel_backend("triton"):`), or for the process (TANDEM_KERNEL_BACKEND).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_BACKENDS = ("torch", "triton")
_forced: str | None = os.environ.get("TANDEM_KERNEL_BACKEND") or None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(backend: str | None) -> None:
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS} or None, got {backend!r}")


_check(_forced)


@contextlib.contextmanager
def kernel_backend(backend: str | None) -> Iterator[None]:
    """Force the backend of every dispatcher inside the block (None: choose by device)."""
    global _forced
    _check(backend)
    prev, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = prev


def use_triton(t: torch.Tensor, backend: str | None = None) -> bool:
    _check(backend)
    choice = backend or _forced
    if choice == "torch":
        return False
    if choice == "triton":
        if not (t.is_cuda or interpreting()):
            raise RuntimeError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return True
    return t.is_cuda
