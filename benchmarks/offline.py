"""Offline throughput of `LLM.generate` next to transformers `generate` on the same
tiny model and prompts, on CPU: a regression guard, not a headline figure.

    python benchmarks/offline.py [--prompts 16] [--input-len 64] [--output-len 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.default_model import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = default_model_path()
    prompts = torch.randint(0, 256, (args.prompts, args.input_len)).tolist()
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    llm = LLM(str(path), max_num_seqs=args.prompts, max_model_len=args.input_len + args.output_len + 1)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    ours = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    t0 = time.perf_counter()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(args.prompts, args.input_len,
                             dtype=torch.long), max_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    theirs = (hf_out.shape[1] - args.input_len) * args.prompts / (time.perf_counter() - t0)
    same = sum(o.token_ids == h[args.input_len:].tolist() for o, h in zip(outs, hf_out))

    print(f"model: embedded default (DeepSeek-V3 architecture, tiny), CPU, {torch.get_num_threads()} threads")
    print(f"{args.prompts} prompts x {args.input_len} in / {args.output_len} out, greedy")
    print(f"{'engine':<14}{'tokens/s':>10}")
    print(f"{'tandem LLM':<14}{ours:>10.1f}")
    print(f"{'transformers':<14}{theirs:>10.1f}")
    print(f"greedy outputs identical to transformers: {same}/{args.prompts}")


if __name__ == "__main__":
    main()
