"""The persistent per-request state table (one row per running request).

Everything a step needs about a request lives here, on the device: its tokens, how
many are computed, its block table and its sampling settings. Rows change only when
requests enter or leave or get new blocks; a step's inputs are gathered from the
table on the device, and the sampled token is written back into it there, so the
next step reads it without the host ever touching token values.

Host-side changes are staged and applied once per step in a few launches (one
scatter for token ids, one for block-table entries, one per scalar field), through
non-blocking copies from fresh host arrays, so applying them never waits for the
device (the previous step may still be running under async scheduling).

One extra row, `pad_row`, stays all zeros: padded batch entries of a CUDA-graph
replay point at it with no tokens scheduled, so they read and write nothing real.
(Its state slot is the scratch slot max_reqs, which hybrid models' state caches hold
beyond the real ones: Mamba layers update a state for every decode entry.)
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.scheduler_output import NewRequestData
from engine.ops.penalties import PenaltyTables
from engine.runner.host_copy import to_device


class RequestStateTable:
    def __init__(self, max_reqs: int, max_model_len: int, max_blocks: int, device: torch.device,
                 vocab_size: int = 1) -> None:
        self.max_reqs, self.max_model_len = max_reqs, max_model_len
        self.device = device
        self.pad_row = max_reqs
        rows = max_reqs + 1
        z = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.token_ids = z(rows, max_model_len)
        self.num_tokens = z(rows)           # known tokens, sampled ones included
        self.num_computed = z(rows)         # authoritative on the device
        self.block_table = z(rows, max_blocks)
        self.temperature = z(rows, dtype=torch.float32)
        self.top_k = z(rows)
        self.top_p = z(rows, dtype=torch.float32)
        self.min_p = z(rows, dtype=torch.float32)
        self.seeds = z(rows, dtype=torch.int64)
        self.state_slot = z(rows)           # hybrid models: the request's Mamba state slot
        self.state_slot[self.pad_row] = max_reqs
        # Logit bias and penalties (engine/ops/penalties.py); the pad row's flag stays 0.
        self.penalties = PenaltyTables.empty(rows, vocab_size, device)
        # Host mirrors of what the host decides anyway (no device reads needed). The
        # counts are optimistic under async scheduling: they include tokens still
        # being sampled.
        self.rows: dict[str, int] = {}
        self._free = list(range(max_reqs - 1, -1, -1))
        self.num_blocks_cpu = np.zeros(rows, dtype=np.int64)
        self.num_tokens_cpu = np.zeros(rows, dtype=np.int64)
        self.num_computed_cpu = np.zeros(rows, dtype=np.int64)
        self.logprobs_cpu: list[int | None] = [None] * rows
        self.penalized_cpu = np.zeros(rows, dtype=bool)       # the row's flag, as the device has it
        self.num_prompt_cpu = np.zeros(rows, dtype=np.int64)
        self.prompt_logprobs_cpu = np.full(rows, -1, dtype=np.int64)   # -1: none wanted
        self._staged_new: list[tuple[int, NewRequestData]] = []
        self._staged_blocks: list[tuple[int, int, list[int]]] = []   # (row, first column, block ids)

    # -- host-side changes (staged) ------------------------------------------------
    def add(self, new: NewRequestData) -> int:
        n = len(new.token_ids)
        if n > self.max_model_len:
            raise ValueError(f"request {new.req_id} has {n} tokens, above max_model_len {self.max_model_len}")
        row = self._free.pop()
        self.rows[new.req_id] = row
        self.num_blocks_cpu[row] = 0
        self.num_tokens_cpu[row] = n
        self.num_computed_cpu[row] = new.num_computed_tokens
        sp = new.sampling_params
        self.logprobs_cpu[row] = sp.logprobs
        self.penalized_cpu[row] = sp.uses_penalties
        self.num_prompt_cpu[row] = new.num_prompt_tokens
        self.prompt_logprobs_cpu[row] = -1 if sp.prompt_logprobs is None else sp.prompt_logprobs
        self._staged_new.append((row, new))
        self.append_blocks(new.req_id, new.block_ids[0])
        return row

    def append_blocks(self, req_id: str, block_ids: list[int]) -> None:
        if not block_ids:
            return
        row = self.rows[req_id]
        start = int(self.num_blocks_cpu[row])
        self._staged_blocks.append((row, start, block_ids))
        self.num_blocks_cpu[row] = start + len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.rows.pop(req_id, None)
        if row is not None:
            self._free.append(row)

    # -- applying the staged changes on the device -------------------------------------
    def flush(self) -> None:
        if self._staged_new:
            self._flush_new(self._staged_new)
            self._staged_new = []
        if self._staged_blocks:
            rows, cols, vals = [], [], []
            for row, start, ids in self._staged_blocks:
                rows.append(np.full(len(ids), row, dtype=np.int64))
                cols.append(np.arange(start, start + len(ids), dtype=np.int64))
                vals.append(np.asarray(ids, dtype=np.int64))
            flat = np.concatenate(rows) * self.block_table.shape[1] + np.concatenate(cols)
            self._scatter(self.block_table, flat, np.concatenate(vals))
            self._staged_blocks = []

    def _flush_new(self, staged: list[tuple[int, NewRequestData]]) -> None:
        rows = np.array([r for r, _ in staged], dtype=np.int64)
        lens = np.array([len(n.token_ids) for _, n in staged], dtype=np.int64)
        # Token ids: one flat scatter into token_ids.view(-1).
        starts = np.repeat(rows * self.max_model_len - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
        flat = starts + np.arange(int(lens.sum()), dtype=np.int64)
        tokens = np.fromiter((t for _, n in staged for t in n.token_ids), dtype=np.int64, count=int(lens.sum()))
        self._scatter(self.token_ids, flat, tokens)
        ints = np.array([[len(n.token_ids), n.num_computed_tokens, n.sampling_params.top_k, n.seed,
                          n.block_ids[1][0] if len(n.block_ids) > 1 and n.block_ids[1] else 0]
                         for _, n in staged], dtype=np.int64)
        floats = np.array([[n.sampling_params.temperature, n.sampling_params.top_p, n.sampling_params.min_p]
                           for _, n in staged], dtype=np.float32)
        idx = self._to_device(rows)
        ints_d, floats_d = self._to_device(ints), self._to_device(floats)
        self.num_tokens[idx] = ints_d[:, 0].to(torch.int32)
        self.num_computed[idx] = ints_d[:, 1].to(torch.int32)
        self.top_k[idx] = ints_d[:, 2].to(torch.int32)
        self.seeds[idx] = ints_d[:, 3]
        self.state_slot[idx] = ints_d[:, 4].to(torch.int32)
        self.temperature[idx] = floats_d[:, 0]
        self.top_p[idx] = floats_d[:, 1]
        self.min_p[idx] = floats_d[:, 2]
        self._flush_penalties(staged, rows, idx)

    def _flush_penalties(self, staged: list[tuple[int, NewRequestData]], rows: np.ndarray,
                         idx: torch.Tensor) -> None:
        """Set every new row's flag; rebuild the tables of rows that use penalties from
        their tokens (prompt mask, counts of the tokens generated so far: a resumed or
        remotely prefilled request brings some) and their logit bias."""
        p = self.penalties
        on = np.array([n.sampling_params.uses_penalties for _, n in staged])
        p.flags[idx] = self._to_device(on.astype(np.int32))
        if not on.any():
            return
        pen = [(r, n) for r, n in staged if n.sampling_params.uses_penalties]
        prow = np.array([r for r, _ in pen], dtype=np.int64)
        pidx = self._to_device(prow)
        p.counts[pidx] = 0
        p.in_prompt[pidx] = False
        vocab = p.counts.shape[1]
        prompt = [(r, t) for r, n in pen for t in n.token_ids[:n.num_prompt_tokens]]
        self._scatter(p.in_prompt, *(np.array(x, dtype=np.int64) for x in zip(*prompt)), vocab=vocab, value=1)
        out = [(r, t) for r, n in pen for t in n.token_ids[n.num_prompt_tokens:]]
        if out:
            flat = np.array([r * vocab + t for r, t in out], dtype=np.int64)
            p.counts.view(-1).index_put_((self._to_device(flat),), torch.ones(len(flat), dtype=torch.int32,
                                                                            device=self.device), accumulate=True)
        sp = [n.sampling_params for _, n in pen]
        scal = np.array([[s.presence_penalty, s.frequency_penalty, s.repetition_penalty] for s in sp], dtype=np.float32)
        scal_d = self._to_device(scal)
        p.presence[pidx], p.frequency[pidx], p.repetition[pidx] = scal_d[:, 0], scal_d[:, 1], scal_d[:, 2]
        ids = np.zeros((len(pen), p.bias_ids.shape[1]), dtype=np.int32)
        vals = np.zeros(ids.shape, dtype=np.float32)
        for i, s in enumerate(sp):
            for j, (tok, bias) in enumerate((s.logit_bias or {}).items()):
                ids[i, j], vals[i, j] = tok, bias
        p.bias_ids[pidx] = self._to_device(ids)
        p.bias_vals[pidx] = self._to_device(vals)
        p.num_bias[pidx] = self._to_device(np.array([len(s.logit_bias or {}) for s in sp], dtype=np.int32))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return to_device(a, self.device)

    def _scatter(self, dst: torch.Tensor, flat_idx: np.ndarray, values: np.ndarray, vocab: int | None = None,
                 value: int | None = None) -> None:
        if vocab is not None:       # (row, column) pairs of a [rows, vocab] table, all set to `value`
            flat_idx, values = flat_idx * vocab + values, np.full(len(values), value, dtype=np.int64)
        both = self._to_device(np.stack([flat_idx, values]))
        dst.view(-1)[both[0]] = both[1].to(dst.dtype)
