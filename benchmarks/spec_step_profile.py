"""Where a speculative decode step's device time goes: kernels per step and the costliest
kernels, with and without P-EAGLE, on the pair benchmarks/train_peagle.py saved.

    python benchmarks/spec_step_profile.py [--dir /tmp/peagle] [--out FILE] [--ks 0 1 7] [--batches 1 8]

For each (K, batch): engine.LLM as train_peagle.py measures it (CUDA graphs, async
scheduling, greedy), a warm-up, then torch.profiler (CUDA activity) over 24 decode
steps. Each JSON line: graph replays and eager steps seen (a decode step that misses its
graph runs eagerly and pays one launch per kernel), kernel fallbacks to torch
references, kernels per step, device microseconds per step, and the 15 kernels with the
most device time, and the wall time per step of the same run unprofiled (host-bound
when it is well above the device time). K=0: no speculation.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import emit, record_to


def profile_one(target: Path, head: Path, k: int, batch: int, device: str = "cuda", steps: int = 24) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams, kernels
    spec = None if k == 0 else {"method": "peagle", "model": str(head), "num_speculative_tokens": k}
    llm = LLM(str(target), device=device, max_num_seqs=64, max_model_len=512, block_size=16, num_kv_blocks=64 * 32 + 64,
              speculative_config=spec)
    runner = llm.engine.runner
    prompts = [[(7 * i + j) % 250 for j in range(64)] for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))   # warm-up
    seen = collections.Counter()
    for g in (runner.spec_graphs or {0: runner.graphs}).values():
        if g is not None:
            launch = g._launch
            g._launch = lambda size, lens, launch=launch: seen.update(replays=1) or launch(size, lens)
    if runner.spec is not None:
        fwd = runner._spec_forward
        runner._spec_forward = lambda *a, **kw: seen.update(eager_spec_steps=1) or fwd(*a, **kw)
    fallbacks = kernels.num_fallbacks
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
        if cuda:
            torch.cuda.synchronize()
    n_steps = runner.num_forwards
    # The same run unprofiled, on the wall clock: against device_us_per_step it says
    # whether the step is bound by the device or by the host.
    before = runner.num_forwards
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
    if cuda:
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6 / max(runner.num_forwards - before, 1)
    # Kernels: the entries with device time of their own and no host time (graph
    # replays included: CUPTI traces the kernels inside them).
    per_kernel = {e.key[:90]: (e.count, e.self_device_time_total) for e in prof.key_averages()
                  if e.self_device_time_total > 0 and e.self_cpu_time_total == 0}
    total_n = sum(v[0] for v in per_kernel.values())
    total_us = sum(v[1] for v in per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:15]
    steps_run = seen["replays"] + seen["eager_spec_steps"] or steps
    rec = dict(phase="profile", k=k, batch=batch, graphs_on=runner.graphs is not None, **seen,
               fallbacks=kernels.num_fallbacks - fallbacks, forwards_total=n_steps,
               kernels_per_step=round(total_n / steps_run, 1), device_us_per_step=round(total_us / steps_run, 1),
               wall_us_per_step=round(wall_us, 1),
               top=[(name, n, round(us, 1)) for name, (n, us) in top])
    del llm
    if cuda:
        torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/peagle")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 7])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (no kernels to count)")
    a = ap.parse_args()
    record_to(a.out)
    root = Path(a.dir)
    for k in a.ks:
        for b in a.batches:
            try:
                emit(**profile_one(root / "target", root / "head", k, b, a.device))
            except Exception as e:     # noqa: BLE001 (report it and profile the rest)
                emit(phase="error", k=k, batch=b, error=repr(e)[:400])


if __name__ == "__main__":
    main()
