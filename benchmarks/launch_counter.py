"""Kernel launches counted on the CPU, through the Triton interpreter: inside a replayed
CUDA graph every launch costs ~3 us of latency beyond its run time on the H200
(benchmarks/RESULTS.md), so a step's launch count is what fusions shrink.

A launch is a Triton kernel (counted by name, as "triton:NAME") or an aten op that would
run a kernel on the device: views, allocations and metadata queries are not counted, nor
the interpreter's own tensor work inside a Triton launch.
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch nothing on the device besides views (allocations, metadata).
NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "item",
               "_local_scalar_dense", "is_nonzero", "set_", "resize_", "sym_size", "sym_stride", "sym_numel",
               "dim", "size", "stride", "numel", "is_same_size"}


class LaunchCounter(TorchDispatchMode):
    """`with LaunchCounter() as c:` counts launches into c.ops (op or "triton:NAME" -> count).
    Counters must not nest (an outer one would see the inner one's ops again): count the
    parts of a run by taking differences of c.ops."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self._inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside_triton and not func.is_view and name not in NOT_KERNELS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def triton(self) -> collections.Counter:
        return collections.Counter({k[7:]: n for k, n in self.ops.items() if k.startswith("triton:")})

    @property
    def torch_ops(self) -> collections.Counter:
        return collections.Counter({k: n for k, n in self.ops.items() if not k.startswith("triton:")})

    def __enter__(self):
        from triton.runtime.interpreter import GridExecutor
        self._call = call = GridExecutor.__call__
        counter = self

        def counted(executor, *args, **kwargs):
            counter.ops[f"triton:{executor.fn.__name__}"] += 1
            counter._inside_triton += 1
            try:
                return call(executor, *args, **kwargs)
            finally:
                counter._inside_triton -= 1
        GridExecutor.__call__ = counted
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import GridExecutor
        GridExecutor.__call__ = self._call
        return super().__exit__(*exc)
