"""Engine settings, validated once, with the derived values the parts need."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Attention backends by vLLM's names. None (the default): the engine's own choice, torch's
# SDPA (cuDNN) for steps of whole prompts of one length on CUDA and the Triton kernel
# otherwise; TRITON_ATTN: the Triton kernel always; FLASHINFER: flashinfer-python for the
# GQA layers where it imports and fits (engine/layers/flashinfer_attention.py), else the
# default with a log line saying why. TANDEM_ATTENTION_BACKEND sets it when the engine
# argument does not (vLLM's VLLM_ATTENTION_BACKEND).
ATTENTION_BACKENDS = ("TRITON_ATTN", "FLASHINFER")


def attention_backend_name(value: str | None) -> str | None:
    value = value or os.environ.get("TANDEM_ATTENTION_BACKEND") or None
    if value is None:
        return None
    if value.upper() not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {value!r}")
    return value.upper()


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineConfig:
    model: str = "default"              # a Hugging Face folder, or "default" (the embedded model)
    tokenizer: str | None = None        # defaults to the model folder
    device: str = "cpu"
    dtype: str = "auto"                 # auto: float32 on CPU, the checkpoint's dtype on CUDA
    load_format: str = "auto"           # auto (safetensors) | random (real shapes, random weights)
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None    # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_kv_blocks: int | None = None    # overrides the memory-based sizing
    kv_cache_memory_gb: float = 1.0     # CPU: memory for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory the engine may hold
    max_logprobs: int = 20
    # CUDA graphs for pure decode steps, and one step in flight (the host schedules
    # step N+1 while the device runs step N). None: on for CUDA, off on CPU.
    enable_cuda_graphs: bool | None = None
    async_scheduling: bool | None = None
    kv_load_failure_policy: str = "recompute"  # remote-prefill KV lost: recompute here, or "fail"
    # P-EAGLE speculative decoding, vLLM's shape: {"method": "peagle", "model": HEAD_FOLDER,
    # "num_speculative_tokens": K}; None = off.
    speculative_config: dict | None = None
    attention_backend: str | None = None   # ATTENTION_BACKENDS, or None: the engine's choice

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append("device 'cuda' asked for, but torch sees no CUDA device")
        if self.dtype != "auto" and str(self.dtype).removeprefix("torch.") not in _DTYPES:
            problems.append(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "random"):
            problems.append(f"load_format must be 'auto' or 'random', got {self.load_format!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            problems.append("max_model_len must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            problems.append("num_kv_blocks must be >= 1")
        if self.kv_load_failure_policy not in ("recompute", "fail"):
            problems.append(f"kv_load_failure_policy must be 'recompute' or 'fail', got {self.kv_load_failure_policy!r}")
        try:
            self.attention_backend = attention_backend_name(self.attention_backend)
        except ValueError as e:
            problems.append(str(e))
        on_cuda = self.device.startswith("cuda")
        if self.enable_cuda_graphs is None:
            self.enable_cuda_graphs = on_cuda
        elif self.enable_cuda_graphs and not on_cuda:
            problems.append("enable_cuda_graphs needs device='cuda'")
        if self.async_scheduling is None:
            self.async_scheduling = on_cuda
        if self.speculative_config is not None:
            from engine.spec.settings import SpecDecodeSettings
            try:
                SpecDecodeSettings.from_dict(self.speculative_config)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("invalid engine settings: " + "; ".join(problems))

    def torch_dtype(self, model_config) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[str(self.dtype).removeprefix("torch.")]
        if self.device == "cpu":
            return torch.float32
        ckpt = getattr(model_config, "torch_dtype", None) or getattr(model_config, "dtype", None)
        ckpt = str(ckpt).removeprefix("torch.") if ckpt is not None else "bfloat16"
        return _DTYPES.get(ckpt, torch.bfloat16) if ckpt != "float32" else torch.bfloat16
