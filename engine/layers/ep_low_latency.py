"""Low-latency expert-parallel MoE for decode: fixed buffers in peer-mapped memory, no
collective, no host sync, so the exchange runs inside a CUDA graph.

The normal dispatch (ep_dispatch.py) sizes its messages from counts it reads back to
the host, one sync and three all-to-alls per layer: about 0.8 ms on two H200s, a
decode step's worth over 48 layers. Here every rank owns one buffer that every other
rank writes into directly (engine/distributed/peer_memory.py), laid out for a fixed
capacity of M tokens per rank:

    rx    [W, M, H]      hidden rows, by source rank and token slot
    ids   [W, M, K]      the local expert slot of each choice served here, else -1
    wts   [W, M, K]      the choice's routing weight
    pairs [M * K + 1, H] this rank's tokens' expert outputs, one row per (token, choice);
                         the last row is a sink for choices another rank serves

One layer: each rank writes its tokens into every destination's rx/ids/wts (rows only
where a choice lands there); barrier; each rank runs its experts over all W * M rows
(ids of -1 are skipped on the device, so only real work is done) and writes each
entry's weighted output straight into the source rank's `pairs` row; barrier; each
rank sums its tokens' K outputs in ascending logical expert id, as the reference
does. Two barriers per layer keep the buffers safe to reuse: a rank passes the second
only when every rank has finished reading its rx, and the next layer's first only
when every rank has read its pairs.

On CUDA the writes are two Triton kernels (the return write is the MoE kernel's own
epilogue); on CPU the same layout is filled with torch copies, which is how the CPU
tests check the protocol.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.distributed.peer_memory import PeerMemory
from engine.kernels import use_triton
from engine.ops.moe import moe_entries_ref

_ALIGN = 256


class LowLatencyBuffers:
    """The four regions of every rank's peer buffer, as tensors mapped here."""

    def __init__(self, memory: PeerMemory, capacity: int, hidden: int, top_k: int, dtype: torch.dtype) -> None:
        self.memory = memory
        self.rank, self.world = memory.rank, memory.world_size
        self.capacity, self.hidden, self.top_k, self.dtype = capacity, hidden, top_k, dtype
        regions = self.regions(self.world, capacity, hidden, top_k, dtype)
        self.views = [{name: _carve(memory.buffer(r), off, shape, dt) for name, (off, shape, dt) in regions.items()}
                      for r in range(self.world)]
        device = memory.buffer(self.rank).device
        self.ptrs = {name: torch.tensor([v[name].data_ptr() for v in self.views], dtype=torch.int64, device=device)
                     for name in regions}

    @staticmethod
    def regions(world: int, capacity: int, hidden: int, top_k: int, dtype: torch.dtype
                ) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        shapes = {"rx": ((world, capacity, hidden), dtype), "ids": ((world, capacity, top_k), torch.int32),
                  "wts": ((world, capacity, top_k), torch.float32), "pairs": ((capacity * top_k + 1, hidden), dtype)}
        out, off = {}, 0
        for name, (shape, dt) in shapes.items():
            out[name] = (off, shape, dt)
            off += -(-_nbytes(shape, dt) // _ALIGN) * _ALIGN
        return out

    @classmethod
    def nbytes(cls, world: int, capacity: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
        off, shape, dt = cls.regions(world, capacity, hidden, top_k, dtype)["pairs"]
        return off + _nbytes(shape, dt)

    def close(self) -> None:
        self.views, self.ptrs = [], {}
        self.memory.close()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _carve(buf: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return buf[offset:offset + _nbytes(shape, dtype)].view(dtype).view(shape)


def low_latency_moe(buffers: LowLatencyBuffers, slots_per_rank: int, moe: nn.Module, x: torch.Tensor,
                    weights: torch.Tensor, phys: torch.Tensor, logical_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], weights/phys/logical_ids [T, K] (phys: global slot ids) -> [T, H]."""
    b = buffers
    tokens, k = phys.shape
    if tokens > b.capacity:
        raise ValueError(f"{tokens} tokens in one step exceed the low-latency dispatch capacity of {b.capacity} "
                         f"per rank (max_num_batched_tokens); use the normal dispatch for larger steps")
    if tokens == 0 and k != b.top_k:        # an idle rank's pass (dummy_moe_pass): shape it
        phys = phys.new_empty(0, b.top_k)
        weights, logical_ids, k = weights.new_empty(0, b.top_k), phys, b.top_k
    if k != b.top_k or x.shape[1] != b.hidden:
        raise ValueError(f"buffers were laid out for top-{b.top_k} x {b.hidden}, got top-{k} x {x.shape[1]}")
    mine = b.views[b.rank]
    rows, per_src = b.world * b.capacity, b.capacity * k
    if use_triton(x):
        from engine.kernels.ep_low_latency import dispatch_to_peers
        from engine.kernels.moe import PeerRows, default_config, moe_entries_triton
        dispatch_to_peers(x, phys, weights, b.ptrs["rx"], b.ptrs["ids"], b.ptrs["wts"], b.rank, slots_per_rank,
                          b.capacity)
        b.memory.barrier()
        # Tiles for what a rank serves when every rank sends as many tokens as this one
        # (its share of each source's entries), not for the padded W * M * K that the
        # grid has to allow: decode-sized batches stream weights with small tiles.
        config = default_config(max(tokens, 1) * k, moe.w13.shape[0])
        moe_entries_triton(mine["rx"].view(rows, -1), moe.w13, moe.w2, mine["ids"].view(rows, k),
                           mine["wts"].view(rows, k), config, PeerRows(b.ptrs["pairs"], per_src, b.hidden),
                           activation=moe.activation)
        b.memory.barrier()
        return sum_pairs_in_logical_order(mine["pairs"][:tokens * k].view(tokens, k, b.hidden), logical_ids)

    owner = torch.div(phys, slots_per_rank, rounding_mode="floor")
    for dst, view in enumerate(b.views):
        local = torch.where(owner == dst, phys - dst * slots_per_rank, -1).to(torch.int32)
        view["ids"][b.rank, :tokens] = local
        view["ids"][b.rank, tokens:] = -1
        view["wts"][b.rank, :tokens] = weights.float()
        view["rx"][b.rank, :tokens] = x
    b.memory.barrier()
    ids = mine["ids"].view(rows, k)
    entries = moe_entries_ref(mine["rx"].view(rows, -1), moe.w13, moe.w2, ids, mine["wts"].view(rows, k).to(x.dtype),
                              moe.activation)
    sink = torch.full((per_src,), per_src, dtype=torch.long, device=x.device)
    every = torch.arange(per_src, device=x.device)
    for src, view in enumerate(b.views):
        served = ids.view(b.world, per_src)[src] >= 0
        view["pairs"].index_copy_(0, torch.where(served, every, sink), entries[src * per_src:(src + 1) * per_src])
    b.memory.barrier()
    return sum_pairs_in_logical_order(mine["pairs"][:tokens * k].view(tokens, k, b.hidden), logical_ids)


def sum_pairs_in_logical_order(pairs: torch.Tensor, logical_ids: torch.Tensor) -> torch.Tensor:
    """pairs [T, K, H] (a token's weighted expert outputs in choice order) -> [T, H]:
    summed from zero in ascending logical expert id, as the reference's expert loop
    (in float32 by the Triton kernel, in the pairs' dtype by the torch reference)."""
    tokens, k, _ = pairs.shape
    by_expert = logical_ids.argsort(dim=1, stable=True)
    if use_triton(pairs):
        from engine.kernels.ep_low_latency import sum_pairs_triton
        return sum_pairs_triton(pairs, by_expert)
    out = pairs.new_zeros(tokens, pairs.shape[2])
    rows = torch.arange(tokens, device=pairs.device)
    for j in range(k):
        out += pairs[rows, by_expert[:, j]]
    return out
