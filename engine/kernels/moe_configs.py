"""Tuned tile configs of the fused MoE kernels, shipped as data files read at run time.

One JSON file per (experts, intermediate size, device), named as vLLM names its own
(`E=64,N=1408,device_name=NVIDIA_H200.json` in engine/kernels/configs/): keys are token
counts, values the tiles that were fastest at that count on that device; a call takes
the entry of the nearest count within a factor of 2 (a sparse table says nothing about
counts far from its keys). `benchmarks/tune_moe.py` writes them on the device. Without
a file or a near entry the kernel's built-in heuristic chooses.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger("engine.kernels")


def config_file_name(num_experts: int, intermediate: int, device_name: str) -> str:
    return f"E={num_experts},N={intermediate},device_name={device_name.replace(' ', '_')}.json"


@functools.cache
def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@functools.cache
def load(num_experts: int, intermediate: int, name: str) -> dict[int, dict] | None:
    path = CONFIG_DIR / config_file_name(num_experts, intermediate, name)
    if not path.exists():
        return None
    table = {int(m): cfg for m, cfg in json.loads(path.read_text()).items()}
    log.info("fused MoE: tuned configs from %s", path.name)
    return table


def tuned(num_tokens: int, num_experts: int, intermediate: int, device: torch.device) -> dict | None:
    """The tuned entry nearest to num_tokens ({BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
    num_warps, num_stages}), or None when no file covers this shape on this device or
    no key is within a factor of 2 of num_tokens."""
    name = device_name(device)
    table = load(num_experts, intermediate, name) if name else None
    if not table:
        return None
    m = min(table, key=lambda k: abs(k - num_tokens))
    return table[m] if m / 2 <= num_tokens <= 2 * m else None
