"""The persistent per-request state table (one row per running request).

Everything a step needs about a request lives here, on the device: its tokens, how
many are computed, its block table and its sampling settings. Rows change only when
requests enter or leave or get new blocks; a step's inputs are gathered from the
table on the device, and the sampled token is written back into it there, so the
next step reads it without the host ever touching token values.
"""

from __future__ import annotations

import torch

from engine.core.scheduler_output import NewRequestData


class RequestStateTable:
    def __init__(self, max_reqs: int, max_model_len: int, max_blocks: int, device: torch.device) -> None:
        self.max_reqs, self.max_model_len = max_reqs, max_model_len
        self.device = device
        z = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.token_ids = z(max_reqs, max_model_len)
        self.num_tokens = z(max_reqs)           # known tokens, sampled ones included
        self.num_computed = z(max_reqs)         # authoritative on the device
        self.block_table = z(max_reqs, max_blocks)
        self.temperature = z(max_reqs, dtype=torch.float32)
        self.top_k = z(max_reqs)
        self.top_p = z(max_reqs, dtype=torch.float32)
        self.min_p = z(max_reqs, dtype=torch.float32)
        self.seeds = z(max_reqs, dtype=torch.int64)
        # Host mirrors of what the host decides anyway (no device reads needed).
        self.rows: dict[str, int] = {}
        self._free = list(range(max_reqs - 1, -1, -1))
        self.num_blocks_cpu = [0] * max_reqs
        self.num_tokens_cpu = [0] * max_reqs
        self.num_computed_cpu = [0] * max_reqs
        self.logprobs_cpu = [None] * max_reqs

    def add(self, new: NewRequestData) -> int:
        row = self._free.pop()
        self.rows[new.req_id] = row
        n = len(new.token_ids)
        if n > self.max_model_len:
            raise ValueError(f"request {new.req_id} has {n} tokens, above max_model_len {self.max_model_len}")
        self.token_ids[row, :n] = torch.tensor(new.token_ids, dtype=torch.int32)
        self.num_tokens[row] = n
        self.num_computed[row] = new.num_computed_tokens
        sp = new.sampling_params
        self.temperature[row] = sp.temperature
        self.top_k[row] = sp.top_k
        self.top_p[row] = sp.top_p
        self.min_p[row] = sp.min_p
        self.seeds[row] = new.seed
        self.num_blocks_cpu[row] = 0
        self.append_blocks(new.req_id, new.block_ids[0])
        self.num_tokens_cpu[row] = n
        self.num_computed_cpu[row] = new.num_computed_tokens
        self.logprobs_cpu[row] = sp.logprobs
        return row

    def append_blocks(self, req_id: str, block_ids: list[int]) -> None:
        if not block_ids:
            return
        row = self.rows[req_id]
        start = self.num_blocks_cpu[row]
        self.block_table[row, start:start + len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)
        self.num_blocks_cpu[row] = start + len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.rows.pop(req_id, None)
        if row is not None:
            self._free.append(row)
