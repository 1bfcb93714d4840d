"""Per-step inputs, built on the device from the state table.

Given the batch's rows and their scheduled token counts, produce input_ids,
positions, query_start_loc, seq_lens, slot_mapping and logits_indices without reading
anything back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import use_triton
from engine.runner.state import RequestStateTable


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor         # [B] int32
    slot_mapping: torch.Tensor     # [T] int64
    logits_indices: torch.Tensor   # [B] int64: each request's last scheduled token
    block_table: torch.Tensor      # [B, max_blocks] int32


def prepare_inputs_ref(table: RequestStateTable, rows: torch.Tensor, num_scheduled: torch.Tensor,
                       num_tokens: int, block_size: int) -> StepInputs:
    """num_tokens may exceed the scheduled total (a padded CUDA-graph batch): the tail
    gets input id 0, position 0 and slot -1 (nothing written)."""
    num_reqs = rows.shape[0]
    device = rows.device
    query_start_loc = torch.zeros(num_reqs + 1, dtype=torch.int32, device=device)
    query_start_loc[1:] = torch.cumsum(num_scheduled, 0)
    real = int(query_start_loc[-1])
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs, device=device), num_scheduled.long(),
                                           output_size=real)
    offset = torch.arange(real, device=device) - query_start_loc[req_of_token]
    computed = table.num_computed[rows].long()
    positions = computed[req_of_token] + offset
    token_rows = rows.long()[req_of_token]
    block_table = table.block_table[rows]
    blocks = block_table[req_of_token, positions // block_size].long()
    pad = num_tokens - real
    zeros = torch.zeros(pad, dtype=torch.long, device=device)
    return StepInputs(
        input_ids=torch.cat([table.token_ids[token_rows, positions].long(), zeros]),
        positions=torch.cat([positions, zeros]),
        query_start_loc=query_start_loc,
        seq_lens=(computed + num_scheduled).to(torch.int32),
        slot_mapping=torch.cat([blocks * block_size + positions % block_size, zeros - 1]),
        logits_indices=(query_start_loc[1:] - 1).clamp(min=0).long(),
        block_table=block_table,
    )


def prepare_inputs(table: RequestStateTable, rows: torch.Tensor, num_scheduled: torch.Tensor,
                   num_tokens: int, block_size: int, backend: str | None = None) -> StepInputs:
    if use_triton(rows, backend):
        from engine.kernels.inputs import prepare_inputs_triton
        return StepInputs(**prepare_inputs_triton(table, rows, num_scheduled, num_tokens, block_size))
    return prepare_inputs_ref(table, rows, num_scheduled, num_tokens, block_size)


def commit_step_ref(table: RequestStateTable, rows: torch.Tensor, num_scheduled: torch.Tensor,
                    sampled: torch.Tensor, sample_mask: torch.Tensor) -> None:
    """Advance computed counts; append the sampled token of rows that finished their
    known tokens (the others were mid-prefill and their sample is dropped)."""
    sample_mask = sample_mask.bool()
    table.num_computed[rows] += num_scheduled.to(table.num_computed.dtype)
    rows_s = rows[sample_mask].long()
    pos = table.num_tokens[rows_s].long()
    table.token_ids[rows_s, pos.clamp(max=table.max_model_len - 1)] = sampled[sample_mask].to(torch.int32)
    table.num_tokens[rows_s] += 1


def commit_step(table: RequestStateTable, rows: torch.Tensor, num_scheduled: torch.Tensor,
                sampled: torch.Tensor, sample_mask: torch.Tensor, backend: str | None = None) -> None:
    """commit_step_ref; on the device one kernel, without the boolean-mask indexing
    (a host sync) of the reference."""
    if use_triton(rows, backend):
        from engine.kernels.inputs import commit_step_triton
        commit_step_triton(table, rows, num_scheduled, sampled, sample_mask)
        return
    commit_step_ref(table, rows, num_scheduled, sampled, sample_mask)
