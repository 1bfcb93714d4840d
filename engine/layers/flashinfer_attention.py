"""FlashInfer (`flashinfer-python`) as the attention of a model's GQA layers.

One `FlashInferAttention` serves every layer: FlashInfer's paged-prefill wrapper takes
whole prompts, chunked prefill and decode alike (a decode is a query of one token; with
GQA that is the tensor-core kernel vLLM's decode wrapper runs too), so one plan per step
covers all layers. It reads the engine's cache in place: each layer's K and V views are
[blocks, block_size, kv_heads, dim] pages ("NHD") with equal strides, which FlashInfer
takes as given (no copy).

Per step, without reading the device:
- plan() on the host from the step's host-known lengths (query_lens_cpu, seq_lens_cpu);
  its indptr arrays go to the device by plain asynchronous copies;
- the page list (each request's first ceil(seq_len / block_size) block ids) is gathered
  on the device from the block table into a fixed-size buffer (`page_indices`), the
  same code eagerly and inside a CUDA graph.

CUDA graphs: one wrapper in FlashInfer's CUDA-graph mode (fixed buffers) per captured
(batch size, query length); the graph holds the page gather and the run, and the
runner's `before_replay` plans with the batch's real lengths ahead of each replay.
Every entry of a padded batch keeps its query rows (padding: no pages), so the rows
FlashInfer reads match the graph's token layout.

plan() copies its schedule from a pinned host buffer of the wrapper, which the next
plan of that wrapper overwrites: before planning, the host waits for the event recorded
after the previous plan's copy. That is the one host wait this backend adds to the step
path, and a short one: the engine core launches step N+1 only after step N-1's tokens
came back, so the wait lasts until the device reaches step N's plan copy (first thing in
a graph replay; eagerly, just before step N's first attention layer).

flashinfer is imported lazily: the engine and its tests run without it.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger("engine.attention")

HEAD_DIMS = (64, 128, 256)          # head dims FlashInfer's prefill kernels are built for
DTYPES = (torch.float16, torch.bfloat16)
WORKSPACE_BYTES = 256 << 20         # FlashInfer's float workspace (split-KV partials), shared


@functools.cache
def import_problem() -> str | None:
    """None when flashinfer imports, else why not."""
    try:
        import flashinfer  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:    # not installed, or its native parts do not load
        return f"flashinfer does not import ({type(e).__name__}: {e}); pip install flashinfer-python"
    return None


def layer_problem(layers, dtype: torch.dtype, device: torch.device, latent_cache: bool) -> str | None:
    """Why FlashInfer cannot take these attention layers (None: it can). One plan serves
    every layer, so they must agree on heads, head dim and scale."""
    if device.type != "cuda":
        return "it needs a CUDA device"
    if latent_cache:
        return "MLA layers (latent cache) are not supported by this backend"
    if dtype not in DTYPES:
        return f"dtype {dtype} (FlashInfer takes float16 or bfloat16)"
    if not layers:
        return "the model has no attention layers"
    shapes = {(a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim, a.scale) for a in layers}
    if len(shapes) > 1:
        return "attention layers of different shapes"
    hq, hkv, d, dv, _ = shapes.pop()
    if d != dv or d not in HEAD_DIMS:
        return f"head dims {d}/{dv} (supported: {HEAD_DIMS}, equal for K and V)"
    if hq % hkv:
        return "query heads that are not a multiple of the KV heads"
    return import_problem()


def plan_arrays(query_lens, seq_lens, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's host inputs from host-known lengths: qo_indptr [B+1], kv_indptr [B+1]
    (pages) and last_page_len [B] (0 for a request with no pages), int32 CPU tensors."""
    q = np.asarray(query_lens, dtype=np.int64)
    s = np.asarray(seq_lens, dtype=np.int64)
    pages = -(-s // block_size)
    last = np.where(pages > 0, s - (pages - 1) * block_size, 0)

    def indptr(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(([0], np.cumsum(x))).astype(np.int32))
    return indptr(q), indptr(pages), torch.from_numpy(last.astype(np.int32))


def page_indices(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """FlashInfer's page list on the device: request i's first ceil(seq_lens[i] / bs)
    block ids, requests one after another, in `out` ([B * width + 1] int32; the last
    element takes the unused entries and is never read). Fixed shapes, no host read."""
    B, width = block_table.shape
    if out is None:
        out = torch.zeros(B * width + 1, dtype=torch.int32, device=block_table.device)
    pages = (seq_lens.long() + block_size - 1) // block_size
    start = torch.cumsum(pages, 0) - pages
    j = torch.arange(width, device=block_table.device)
    dst = torch.where(j[None, :] < pages[:, None], start[:, None] + j[None, :], out.numel() - 1)
    out.scatter_(0, dst.reshape(-1), block_table.reshape(-1).to(torch.int32))
    return out


class _Planned:
    """A wrapper, its page buffer (CUDA-graph mode) and the event after its last plan."""

    def __init__(self, wrapper, pages: torch.Tensor | None) -> None:
        self.wrapper, self.pages, self.copied = wrapper, pages, None


class FlashInferAttention:
    def __init__(self, layer, block_size: int, max_blocks: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_heads, self.num_kv_heads = layer.num_heads, layer.num_kv_heads
        self.head_dim, self.scale = layer.head_dim, layer.scale
        self.block_size, self.max_blocks = block_size, max_blocks
        self.dtype, self.device = dtype, device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.eager = _Planned(self._wrapper(), None)
        self.graphs: dict[tuple[int, int], _Planned] = {}
        self.capturing: tuple[int, int] | None = None   # (batch size, query length) being captured
        self._no_pages = torch.zeros(0, dtype=torch.int32, device=device)
        self.num_plans = self.num_replays = 0

    def _wrapper(self, graph: tuple[int, int] | None = None, pages: torch.Tensor | None = None):
        import flashinfer
        kw = {}
        if graph is not None:
            size = graph[0]
            kw = dict(use_cuda_graph=True, qo_indptr_buf=torch.zeros(size + 1, dtype=torch.int32, device=self.device),
                      paged_kv_indptr_buf=torch.zeros(size + 1, dtype=torch.int32, device=self.device),
                      paged_kv_indices_buf=pages,
                      paged_kv_last_page_len_buf=torch.zeros(size, dtype=torch.int32, device=self.device))
        # fa2: one JIT module for every shape here (fa3 would add a second).
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2", **kw)

    def _graph(self, key: tuple[int, int]) -> _Planned:
        if key not in self.graphs:
            pages = torch.zeros(key[0] * self.max_blocks + 1, dtype=torch.int32, device=self.device)
            self.graphs[key] = _Planned(self._wrapper(key, pages), pages)
        return self.graphs[key]

    def _plan(self, p: _Planned, query_lens, seq_lens, pages: torch.Tensor) -> None:
        if p.copied is not None:
            p.copied.synchronize()      # the last plan's copy has read the pinned buffer
        qo, kv, last = plan_arrays(query_lens, seq_lens, self.block_size)
        p.wrapper.plan(qo, kv, pages, last, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                       causal=True, sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype,
                       non_blocking=True)
        p.copied = torch.cuda.Event()
        p.copied.record()
        self.num_plans += 1

    def _step(self, meta) -> _Planned:
        """The step's planned wrapper (the first layer plans, the others reuse it)."""
        if self.capturing is not None:
            p = self._graph(self.capturing)
            page_indices(meta.block_table, meta.seq_lens, self.block_size, out=p.pages)
            # The warm-up before capture plans (upper-bound lengths); a replay is planned by
            # before_replay, so the capture itself records no plan.
            if not torch.cuda.is_current_stream_capturing():
                self._plan(p, meta.query_lens_cpu, meta.seq_lens_cpu, self._no_pages)
            return p
        pages = page_indices(meta.block_table, meta.seq_lens, self.block_size)
        self._plan(self.eager, meta.query_lens_cpu, meta.seq_lens_cpu, pages)
        return self.eager

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta) -> torch.Tensor:
        """q [T, Hq, D] over the paged cache (this step's K/V already written) -> [T, Hq, D]."""
        p = meta.plans.get("flashinfer")
        if p is None:
            p = meta.plans["flashinfer"] = self._step(meta)
        if q.stride(-1) != 1:
            q = q.contiguous()
        return p.wrapper.run(q, (k_cache, v_cache))

    def before_replay(self, size: int, query_len: int, seq_lens: np.ndarray) -> None:
        """Plan the captured wrapper of (size, query_len) for a batch of len(seq_lens)
        real requests; padding entries keep their query rows and get no pages."""
        self.num_replays += 1
        padded = np.zeros(size, dtype=np.int64)
        padded[:len(seq_lens)] = seq_lens
        self._plan(self._graph((size, query_len)), np.full(size, query_len), padded, self._no_pages)


def make_flashinfer_attention(layers, block_size: int, max_blocks: int, dtype: torch.dtype, device: torch.device,
                              latent_cache: bool) -> FlashInferAttention | None:
    """The backend bound to `layers` (each gets `.flashinfer`), or None with a log line
    saying why FlashInfer is not used (the engine's own kernels then run)."""
    reason = layer_problem(layers, dtype, device, latent_cache)
    if reason is not None:
        log.warning("attention backend FLASHINFER is not used: %s; the engine's Triton attention runs instead", reason)
        return None
    fi = FlashInferAttention(layers[0], block_size, max_blocks, dtype, device)
    for layer in layers:
        layer.flashinfer = fi
    log.info("attention backend: FLASHINFER (%d layers)", len(layers))
    return fi
