"""Triton kernels behind the dispatcher functions of engine/ops, engine/runner/inputs
(a step's inputs from the state table) and engine/runner/spec_inputs (a speculative
step's bookkeeping: verified rows, commit, the head's rows, drafts).

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
import logging
import os
from collections.abc import Iterator

import torch

_BACKENDS = ("torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
log = logging.getLogger("engine.kernels")
_warned: set[str] = set()
num_fallbacks = 0     # calls that fell back to a reference (CUDA-graph capture checks it)
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


def unsupported(op: str, reason: str | None) -> bool:
    """True when a kernel cannot take these inputs (reason given): the dispatcher then
    runs the torch reference, and the first time per (op, reason) a warning says so.
    Never a wrong answer, never a crash for a shape the kernel does not handle."""
    global num_fallbacks
    if reason is None:
        return False
    num_fallbacks += 1
    key = f"{op}: {reason}"
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: the Triton kernel does not support %s; using the torch reference (slower)", op, reason)
    return True


def dtype_problem(*tensors: torch.Tensor) -> str | None:
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"dtype {t.dtype}"
    return None
