"""Launches per batch-1 decode step of a tiny model, counted on CPU through the Triton
interpreter (benchmarks/launch_counter.py): what the decode fusions shrink.

    TRITON_INTERPRET=1 python benchmarks/decode_launches.py [--family qwen3] [--set KEY=INT ...] [--out FILE]

Counts, per decode step (the difference between generating 1 and 1 + steps tokens,
divided by steps): Triton launches by kernel, and torch ops that would launch a kernel
on the device, by op. The whole step: input preparation, the layers, sampling.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.launch_counter import LaunchCounter  # noqa: E402
from benchmarks.records import emit, record_to  # noqa: E402


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
