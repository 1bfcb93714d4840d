"""The matrix-multiply-accumulate that every kernel here uses.

The Triton interpreter (CI) computes bf16/fp16 tl.dot wrongly (numpy has no bf16),
so under the interpreter the operands are upcast to float32 first; on the GPU the
tensor cores take them as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels import interpreting


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        # float32 models (tests) get float32 products, not tf32.
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def upcast_dots() -> bool:
    return interpreting()
