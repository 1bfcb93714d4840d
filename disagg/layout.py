"""What a KV cache looks like to a reader: where it is, how big a block is, and a hash
of everything two engines must agree on before one reads the other's blocks.

The engine's cache is one tensor [blocks, layers, entries, block_size, heads, dim], so
a block (every layer's KV for block_size tokens) is one contiguous run of bytes and
adjacent block ids are adjacent memory: a request's blocks move in as many transfer
descriptors as there are runs of consecutive ids on both sides, not one per layer.

A hybrid model (NemotronH) also holds one fixed-size Mamba state slot per request: every
Mamba layer's conv window and SSM state in one run of bytes (engine/kv_cache/
state_layout.py), so the slot moves in one more descriptor. Its shapes and dtypes are
part of the layout and of its hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import msgpack
import torch

# Fields that must match between producer and consumer (num_blocks may differ).
_COMPATIBLE = ("block_shape", "dtype", "block_size", "block_bytes", "model", "state")


@dataclass(frozen=True)
class BlockLayout:
    block_shape: tuple[int, ...]   # one block: (layers, entries, block_size, heads, dim)
    dtype: str
    block_size: int                # tokens per block
    block_bytes: int
    num_blocks: int
    model: str                     # fingerprint of the model the KV belongs to
    # Hybrid models: the state slot's layout (layers, conv/SSM shapes and dtypes,
    # bytes_per_slot; StateLayout.describe), else None.
    state: dict | None = None
    num_state_slots: int = 0

    @classmethod
    def of(cls, kv_cache: torch.Tensor, model: str, state_cache: torch.Tensor | None = None,
           state: dict | None = None) -> BlockLayout:
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor to be registered for transfer")
        if (state_cache is None) != (state is None):
            raise ValueError("a state cache and its description come together")
        if state_cache is not None and (not state_cache.is_contiguous() or state_cache.dim() != 2
                                        or state_cache.shape[1] * state_cache.element_size() != state["bytes_per_slot"]):
            raise ValueError("the state cache must be one contiguous [slots, bytes_per_slot] tensor")
        shape = tuple(kv_cache.shape[1:])
        return cls(shape, str(kv_cache.dtype).removeprefix("torch."), shape[2],
                   kv_cache[0].numel() * kv_cache.element_size(), kv_cache.shape[0], model,
                   dict(state) if state is not None else None,
                   state_cache.shape[0] if state_cache is not None else 0)

    @property
    def state_bytes(self) -> int:
        return self.state["bytes_per_slot"] if self.state else 0

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
        diffs = [f"{'state slots' if k == 'state' else k}: ours {getattr(self, k)!r}, theirs {getattr(other, k)!r}"
                 for k in _COMPATIBLE if getattr(self, k) != getattr(other, k)]
        return "KV layouts differ (" + "; ".join(diffs) + ")" if diffs else None


# Config keys that say where a checkpoint came from, or which expert slots an EP rank
# holds (its share of the MoE weights, not the KV), not what the model computes.
_PROVENANCE = ("_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "ep_slot_experts")


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
