"""What a KV cache looks like to a reader: where it is, how big a block is, and a hash
of everything two engines must agree on before one reads the other's blocks.

The engine's cache is one tensor [blocks, layers, entries, block_size, heads, dim], so
a block (every layer's KV for block_size tokens) is one contiguous run of bytes and
adjacent block ids are adjacent memory: a request's blocks move in as many transfer
descriptors as there are runs of consecutive ids on both sides, not one per layer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import msgpack
import torch

# Fields that must match between producer and consumer (num_blocks may differ).
_COMPATIBLE = ("block_shape", "dtype", "block_size", "block_bytes", "model")


@dataclass(frozen=True)
class BlockLayout:
    block_shape: tuple[int, ...]   # one block: (layers, entries, block_size, heads, dim)
    dtype: str
    block_size: int                # tokens per block
    block_bytes: int
    num_blocks: int
    model: str                     # fingerprint of the model the KV belongs to

    @classmethod
    def of(cls, kv_cache: torch.Tensor, model: str) -> BlockLayout:
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor to be registered for transfer")
        shape = tuple(kv_cache.shape[1:])
        return cls(shape, str(kv_cache.dtype).removeprefix("torch."), shape[2],
                   kv_cache[0].numel() * kv_cache.element_size(), kv_cache.shape[0], model)

    @property
    def hash(self) -> str:
        fields = asdict(self)
        payload = msgpack.packb([fields[k] if not isinstance(fields[k], tuple) else list(fields[k])
                                 for k in _COMPATIBLE])
        return hashlib.blake2b(payload, digest_size=8).hexdigest()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_shape"] = list(self.block_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BlockLayout:
        return cls(**{**d, "block_shape": tuple(d["block_shape"])})

    def mismatch(self, other: BlockLayout) -> str | None:
        """Why a reader with this layout cannot read `other`'s blocks, or None."""
        diffs = [f"{k}: ours {getattr(self, k)!r}, theirs {getattr(other, k)!r}"
                 for k in _COMPATIBLE if getattr(self, k) != getattr(other, k)]
        return "KV layouts differ (" + "; ".join(diffs) + ")" if diffs else None


# Config keys that say where a checkpoint came from, not what the model computes.
_PROVENANCE = ("_name_or_path", "name_or_path", "_commit_hash", "transformers_version")


def model_fingerprint(config) -> str:
    """Two engines may share KV only if they run the same model: a hash of its config
    (minus where it was loaded from, so two copies of one checkpoint agree)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    text = json.dumps({k: v for k, v in fields.items() if k not in _PROVENANCE}, sort_keys=True, default=str)
    return f"{fields.get('model_type', 'model')}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


def block_runs(local: list[int], remote: list[int]) -> list[tuple[int, int, int]]:
    """Group a block-to-block copy into runs that are consecutive on both sides:
    [(local_start, remote_start, count)]; each run is one transfer descriptor."""
    runs: list[tuple[int, int, int]] = []
    for lo, re in zip(local, remote):
        if runs:
            l0, r0, n = runs[-1]
            if lo == l0 + n and re == r0 + n:
                runs[-1] = (l0, r0, n + 1)
                continue
        runs.append((lo, re, 1))
    return runs
