"""Launches per batch-1 decode step of a tiny model, counted on CPU through the Triton
interpreter: every launch inside a replayed CUDA graph costs ~3 us beyond its run time
(benchmarks/RESULTS.md), so this count is what the decode fusions shrink.

    TRITON_INTERPRET=1 python benchmarks/decode_launches.py [--family qwen3] [--set KEY=INT ...] [--out FILE]

Counts, per decode step (the difference between generating 1 and 1 + steps tokens,
divided by steps): Triton launches by kernel, and torch ops that would launch a
kernel on the device (aten ops that are neither views nor metadata), by op. The whole
step: input preparation, the layers, sampling.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.records import emit, record_to  # noqa: E402

# aten ops that launch nothing on the device (views, shape and metadata queries).
NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "split", "split_with_sizes", "slice", "select", "t",
             "transpose", "permute", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "unbind", "empty",
             "empty_like", "empty_strided", "new_empty", "lift_fresh", "_to_copy_meta", "is_nonzero", "item",
             "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "dim", "size", "stride", "numel",
             "is_same_size", "set_", "resize_", "_reshape_alias", "view_as_real", "view_as_complex"}


class LaunchCounter(TorchDispatchMode):
    """Counts torch ops outside Triton launches (the interpreter's own tensor work is
    not the device's), and Triton launches by kernel name."""

    def __init__(self) -> None:
        super().__init__()
        self.torch_ops: collections.Counter = collections.Counter()
        self.triton: collections.Counter = collections.Counter()
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and name not in NO_KERNEL:
            self.torch_ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from triton.runtime.interpreter import GridExecutor
        self._call = call = GridExecutor.__call__
        counter = self

        def counted(executor, *args, **kwargs):
            counter.triton[executor.fn.__name__] += 1
            counter._inside += 1
            try:
                return call(executor, *args, **kwargs)
            finally:
                counter._inside -= 1
        GridExecutor.__call__ = counted
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import GridExecutor
        GridExecutor.__call__ = self._call
        return super().__exit__(*exc)


def count(folder: Path, steps: int) -> dict:
    from engine import LLM, SamplingParams
    from engine.kernels import kernel_backend
    with kernel_backend("triton"):
        llm = LLM(str(folder), block_size=16)
        prompt = [[5, 17, 99, 3, 42, 7]]
        llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))    # warm-up
        runs = []
        for n in (1, 1 + steps):
            with LaunchCounter() as c:
                llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            runs.append(c)
    per_step = lambda a, b: {k: round((b[k] - a[k]) / steps, 2) for k in sorted(b) if b[k] != a[k]}  # noqa: E731
    triton_ops = per_step(runs[0].triton, runs[1].triton)
    torch_ops = per_step(runs[0].torch_ops, runs[1].torch_ops)
    return dict(triton_per_step=round(sum(triton_ops.values()), 2), torch_per_step=round(sum(torch_ops.values()), 2),
                triton=triton_ops, torch=torch_ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen3", help="a tiny family of tests/engine/tiny_models.py")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="config fields changed from the tiny family's (e.g. qk_rope_head_dim=16)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    record_to(args.out)
    from tests.engine.tiny_models import CONFIGS, build
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    with tempfile.TemporaryDirectory() as d:
        build(args.family, Path(d), **overrides)
        layers = CONFIGS[args.family][2]["num_hidden_layers"]
        emit(family=args.family, layers=layers, overrides=overrides, **count(Path(d), args.steps))


if __name__ == "__main__":
    main()
