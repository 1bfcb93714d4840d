"""A seeded random checkpoint of a benchmark shape, saved in the Hub layout, so that an
engine loads it as it would a real model (load_format=auto) and two engines can be
compared on the same weights (method of shared/anchors/h200-vllm-same-weights.md).

    python benchmarks/random_checkpoint.py MODEL DIR [--seed 2026]

transformers builds the model from benchmarks/shapes/MODEL.json on the GPU in bf16;
every norm weight is 1 and every other parameter N(0, 0.02) from one CUDA generator;
save_pretrained writes safetensors shards of at most 8 GB. An existing checkpoint in DIR
(config.json and a safetensors index) is kept: it is written once per shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

SHAPES = Path(__file__).resolve().parent / "shapes"


def exists(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors*"))


def write(model: str, folder: Path, seed: int = 2026, config: Path | None = None, device: str = "cuda") -> dict:
    """config: a config.json other than the shape's (tiny widths for a CPU smoke run)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if exists(folder):
        return dict(model=model, dir=str(folder), written=False)
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config or SHAPES / f"{model}.json", folder / "config.json")
    cfg = AutoConfig.from_pretrained(str(folder))
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
            n += p.numel()
    hf.save_pretrained(str(folder), max_shard_size="8GB")
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.iterdir())
    return dict(model=model, dir=str(folder), written=True, params=n, gb=size / 1e9, seconds=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=[p.stem for p in SHAPES.glob("*.json")])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    print(json.dumps(dict(phase="checkpoint", **write(args.model, args.dir, args.seed))), flush=True)


if __name__ == "__main__":
    main()
