"""Build a model from a Hugging Face folder (config.json + safetensors), or at its
real shapes with random weights (`load_format="random"`) for benchmarks.

Loading proves completeness: every parameter element must be written exactly once by
checkpoint tensors, and every checkpoint tensor must land somewhere; anything else is
an error that names the tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from engine.models.base import CausalLM
from engine.models.registry import check_raw_config, model_class


def load_config(path: str | Path):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: pass a Hugging Face model folder "
                                f"(config.json, *.safetensors, tokenizer files)")
    check_raw_config(json.loads((path / "config.json").read_text()))
    return AutoConfig.from_pretrained(str(path))


def construct(factory, dtype: torch.dtype, device: str | torch.device):
    """`factory()` with its parameters created in `dtype` on `device` (no copy after)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return factory()
    finally:
        torch.set_default_dtype(prev)


def build_model(config, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    model = construct(lambda: model_class(config)(config), dtype, device)
    # Router scores and their correction bias stay in float32, as in the reference models.
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            p.data = p.data.float()
    return model.eval()


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; the engine loads safetensors checkpoints only")
    for name in files:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in the index but missing; re-download the checkpoint")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise ValueError(f"cannot read {file} ({e}); the file is truncated or corrupt, "
                             f"re-download the checkpoint") from e


@torch.no_grad()
def load_weights(model: CausalLM, path: Path) -> None:
    params = dict(model.named_parameters())
    written = {name: 0 for name in params}
    unexpected = []
    for ckpt_name, tensor in iter_safetensors(path):
        target = model.resolve(ckpt_name)
        if target is None:
            continue
        name, shard = target
        if name is None:
            continue
        if name not in params:
            unexpected.append(ckpt_name)
            continue
        p = params[name]
        try:
            written[name] += p.loader(p.data, tensor.to(p.dtype), shard)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {ckpt_name} does not match the config: {e}") from e
    if unexpected:
        raise ValueError(f"checkpoint tensors that the config has no place for: {_few(unexpected)}; "
                         f"the weights do not match config.json")
    incomplete = [n for n, p in params.items() if written[n] != p.numel()]
    if incomplete:
        raise ValueError(f"parameters missing from the checkpoint (or loaded twice): {_few(incomplete)}; "
                         f"the checkpoint is incomplete or does not match config.json")


@torch.no_grad()
def init_random(model: CausalLM, seed: int = 0) -> None:
    """Deterministic random weights at real shapes: N(0, 0.02) matrices, unit norms."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            p.normal_(0.0, 0.1, generator=gen)
        elif p.dim() == 1:
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


def load_model(path: str | Path | None, config, dtype: torch.dtype, device: str, load_format: str,
               seed: int = 0) -> CausalLM:
    model = build_model(config, dtype, device)
    if load_format == "random":
        init_random(model, seed)
    elif load_format in ("auto", "safetensors"):
        load_weights(model, Path(path))
    else:
        raise ValueError(f"unknown load_format {load_format!r}: use 'auto' or 'random'")
    for layer in model.moe_layers():
        layer.expert_load.zero_()
    return model


def _few(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
