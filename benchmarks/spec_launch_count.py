"""Kernel launches per speculative decode step, counted on the CPU
(benchmarks/launch_counter.py): every launch is a node of the step's CUDA graph, so the
count is what the step's bookkeeping costs.

    TRITON_INTERPRET=1 python benchmarks/spec_launch_count.py [--k 7] [--batch 1] [--steps 8]

A tiny Qwen3-MoE target (train_peagle.py's smoke shape, random weights) and an untrained
2-layer head; the padded graph step (the one a CUDA graph captures) runs eagerly with
every kernel on the Triton backend (through the interpreter). A JSON line gives the mean
per step: total, the target (input prep + forward), verification and drafting, and the
op names of verification and drafting.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.launch_counter import LaunchCounter
from benchmarks.records import emit


def build_pair(folder: Path, k: int) -> tuple[Path, Path]:
    from transformers import Qwen3MoeForCausalLM

    from benchmarks.train_peagle import MASK_ID, target_config
    from engine.spec.checkpoint import save_head
    from engine.spec.train import init_from_target, new_head
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(target_config(smoke=True)).eval()
    model.save_pretrained(str(folder / "target"))
    head = new_head(model.config, None, MASK_ID, k, num_layers=2)
    init_from_target(head, model)
    save_head(head, folder / "head")
    return folder / "target", folder / "head"


def count(k: int, batch: int, steps: int) -> dict:
    from engine import LLM, SamplingParams
    from engine.kernels import kernel_backend
    with tempfile.TemporaryDirectory() as tmp:
        target, head = build_pair(Path(tmp), k)
        spec = {"method": "peagle", "model": str(head), "num_speculative_tokens": k}
        llm = LLM(str(target), max_num_seqs=8, max_model_len=256, block_size=16, speculative_config=spec)
    runner = llm.engine.runner
    ref: list = [None]
    per_step, parts = [], collections.defaultdict(collections.Counter)

    def wrap(obj, name: str, part: str | None = None):
        """part None: one padded step, counted by its own mode; else a part of a step
        (the step's count before and after: dispatch modes must not nest, or the outer
        one sees the inner one's ops again)."""
        fn = getattr(obj, name)

        def counted(*a, **kw):
            c = ref[0]
            if part is not None:
                before = c.ops.copy() if c is not None else None
                try:
                    return fn(*a, **kw)
                finally:
                    if c is not None:
                        parts[part].update(c.ops - before)
            ref[0] = c = LaunchCounter()
            try:
                with c:
                    return fn(*a, **kw)
            finally:
                ref[0] = None
                per_step.append(sum(c.ops.values()))
                parts["step"].update(c.ops)
        setattr(obj, name, counted)

    wrap(runner.spec, "verify", "verify")
    wrap(runner.spec, "propose", "propose")
    wrap(runner, "_spec_graph_step")          # before capture: the padded steps call it
    runner.capture_cuda_graphs(sizes=[batch], eager=True)
    prompts = [[(7 * i + j) % 250 for j in range(24)] for i in range(batch)]
    with kernel_backend("triton"):
        llm.generate(prompts, SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True))
    n = max(len(per_step), 1)
    verify = {op: round(c / n, 2) for op, c in sorted(parts["verify"].items())}
    propose = {op: round(c / n, 2) for op, c in sorted(parts["propose"].items())}
    v, p = sum(parts["verify"].values()) / n, sum(parts["propose"].values()) / n
    total = sum(per_step) / n
    target_ops = {op: round(c / n, 2) for op, c in sorted((parts["step"] - parts["verify"] - parts["propose"]).items())}
    return dict(phase="launch_count", k=k, batch=batch, graph_steps=len(per_step), launches_per_step=round(total, 1),
                target=round(total - v - p, 1), verify=round(v, 1), propose=round(p, 1),
                verify_ops=verify, propose_ops=propose, target_ops=target_ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    emit(**count(args.k, args.batch, args.steps))


if __name__ == "__main__":
    main()
