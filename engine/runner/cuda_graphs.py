"""CUDA graphs of the whole decode step, one per padded batch size.

A decode step (every request computes exactly one token) at batch B replays the graph
of the smallest captured size >= B. Each graph covers input preparation, the model,
the logits, sampling and the commit of the sampled tokens into the state table, so a
replay is one launch instead of thousands. Its only inputs are one static int64
buffer per size, [3, size]: the batch's rows, scheduled counts and sample flags;
padded entries point at the table's all-zero pad row with no tokens, so they write no
KV and no state (the prepare kernel gives their tokens slot -1).

Kernels whose launch grids depend on the step's lengths get fixed ones here: paged
attention a split count chosen for the batch size (the kernel divides the real KV
tiles among the splits at run time), fused MoE a grid sized for the worst case (its
unused blocks exit at once).

An attention backend that plans on the host (FlashInfer) captures into fixed buffers
per (size, query length) and is planned with the batch's real lengths before each
replay (`attention.capturing`, `attention.before_replay`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine import kernels
from engine.runner.host_copy import pinned


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 128, then every 32; always max_num_seqs."""
    sizes = [1, 2, 4, 8, *range(16, 129, 16), *range(160, max_num_seqs + 1, 32)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def bucket_for(sizes: list[int], batch: int) -> int | None:
    """The smallest size that holds the batch, or None when none does."""
    for s in sizes:
        if s >= batch:
            return s
    return None


def pad_step_inputs(rows: np.ndarray, samples: np.ndarray, size: int, pad_row: int, query_len: int = 1
                    ) -> np.ndarray:
    """[3, size] int64: rows, scheduled counts (query_len, or 0 for padding), sample flags."""
    b = rows.shape[0]
    host = np.zeros((3, size), dtype=np.int64)
    host[0, :b] = rows
    host[0, b:] = pad_row
    host[1, :b] = query_len
    host[2, :b] = samples
    return host


# step_fn(rows, nsched, mask, num_tokens, graph_size, seq_lens_cpu=None) -> two output tensors
# ((logits, sampled), or with speculation (tokens, emitted)); seq_lens_cpu (the padded
# batch's lengths, as the host knows them) only where the step runs eagerly.
StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class GraphUnsafe(RuntimeError):
    """The decode step cannot be captured (it would replay wrong results)."""


class DecodeGraphs:
    """query_len: tokens per request of the captured steps (speculative decoding
    verifies K drafts: K + 1); attention: a host-planned attention backend, or None."""

    def __init__(self, step_fn: StepFn, sizes: list[int], pad_row: int, device: torch.device,
                 query_len: int = 1, attention=None) -> None:
        self.step_fn = step_fn
        self.sizes = sizes
        self.pad_row = pad_row
        self.device = device
        self.query_len = query_len
        self.attention = attention
        self.inputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def capture(self) -> None:
        """Largest first, into one memory pool. Each size runs once eagerly first (Triton
        compiles, cuBLAS picks its kernels) with every entry padded, so nothing in the
        cache or the table is touched."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                buf = torch.from_numpy(pad_step_inputs(np.zeros(0, np.int64), np.zeros(0, bool), size,
                                                       self.pad_row)).to(self.device)
                self.inputs[size] = buf
                before = kernels.num_fallbacks
                if self.attention is not None:
                    self.attention.capturing = (size, self.query_len)
                try:
                    self.step_fn(buf[0], buf[1], buf[2], size * self.query_len, size)
                    if kernels.num_fallbacks != before:
                        # A torch reference reads host-side lengths, which a graph would freeze.
                        raise GraphUnsafe("an operation fell back to its torch reference (see the warning above)")
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        logits, sampled = self.step_fn(buf[0], buf[1], buf[2], size * self.query_len, size)
                finally:
                    if self.attention is not None:
                        self.attention.capturing = None
                self.graphs[size] = (graph, logits, sampled)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def size_for(self, batch: int) -> int | None:
        return bucket_for(self.sizes, batch)

    def replay(self, rows: np.ndarray, samples: np.ndarray, size: int,
               seq_lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decode step of the batch; returns (logits, sampled) of the graph's
        static outputs (padded to `size`)."""
        host = pad_step_inputs(rows, samples, size, self.pad_row, self.query_len)
        self.inputs[size].copy_(pinned(host), non_blocking=True)
        return self._launch(size, seq_lens)

    def _launch(self, size: int, seq_lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        graph, logits, sampled = self.graphs[size]
        if self.attention is not None:
            self.attention.before_replay(size, self.query_len, seq_lens)
        graph.replay()
        return logits, sampled


class EagerPaddedSteps(DecodeGraphs):
    """The same padded decode steps run eagerly (no capture): checks the padding path
    where CUDA graphs cannot run (CPU tests) and isolates graphs when debugging."""

    def capture(self) -> None:
        for size in self.sizes:
            self.inputs[size] = torch.from_numpy(
                pad_step_inputs(np.zeros(0, np.int64), np.zeros(0, bool), size, self.pad_row)).to(self.device)

    def _launch(self, size: int, seq_lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.inputs[size]
        padded = seq_lens.tolist() + [0] * (size - seq_lens.shape[0])
        return self.step_fn(buf[0], buf[1], buf[2], size * self.query_len, size, padded)
