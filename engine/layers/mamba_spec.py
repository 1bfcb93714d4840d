"""Mamba-2 layers in a speculative verification step: a state per verified token.

A request that verifies k drafts runs the query [x_0, d_1..d_k]; attention KV of
rejected drafts is overwritten later, but a Mamba layer's conv window and SSM state
would have advanced through all k+1 tokens. So for these requests each layer runs its
recurrence token by token with the single-token decode ops, on a copy of the slot's
state, and keeps the state after every token (`history`); after the rejection sampler
`commit_states` writes the state after token `emitted - 1` (x_0 and the accepted
drafts) into the request's slot, on the device. Requests without drafts (prompt
chunks, a first token) take the layer's chunked path as in any step; drafting requests
ride along there on the scratch slot, from a zero state, and their rows are replaced.

Every shape is host-known and nothing is read back (no `.item()`, no boolean indexing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.ops.mamba import causal_conv1d_update, selective_state_update


@dataclass
class VerifySteps:
    """How the Mamba layers run one verification step (built by `verify_steps`)."""
    num_steps: int                # J: the most drafts a request verifies + 1
    read_rows: torch.Tensor       # [J, B] int64: the step's row of request i's token j (clamped into its query)
    write_rows: torch.Tensor      # [J, B] int64: the same, or T (a dump row) past the query / without drafts
    drafting: torch.Tensor        # [B] bool: the request verifies drafts
    chunked: bool                 # some request has no drafts: the chunked path runs
    chunked_slots: torch.Tensor   # [B] int32: slots of the chunked path (drafting requests: the scratch slot)
    chunked_init: torch.Tensor    # [B] bool: has_initial_state there (false for drafting requests)
    # Per Mamba layer, in order: (conv [B, J, K-1, C], ssm [B, J, H, P, N]), the state after each token.
    history: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def verify_steps(query_start_loc: torch.Tensor, ndraft: torch.Tensor, state_slots: torch.Tensor,
                 has_initial_state: torch.Tensor, scratch_slot: int, max_drafts: int,
                 any_plain: bool) -> VerifySteps:
    """query_start_loc [B+1], ndraft [B] (device); max_drafts, any_plain (some request
    verifies no drafts): host-known."""
    J = max_drafts + 1
    dev = query_start_loc.device
    start = query_start_loc[:-1].long()
    qlen = query_start_loc[1:].long() - start
    T = query_start_loc[-1:].long()
    j = torch.arange(J, device=dev)[:, None]
    drafting = ndraft > 0
    read = (start + torch.minimum(j, (qlen - 1).clamp(min=0))).clamp(max=(T - 1).clamp(min=0))
    write = torch.where(drafting & (j < qlen), start + j, T)     # (a drafting query is its k + 1 tokens)
    slots = torch.where(drafting, torch.full_like(state_slots, scratch_slot), state_slots)
    return VerifySteps(J, read, write, drafting, any_plain, slots, has_initial_state & ~drafting)


def run_token_by_token(steps: VerifySteps, x: torch.Tensor, state: torch.Tensor, state_slots: torch.Tensor,
                       out: torch.Tensor, update) -> torch.Tensor:
    """Run `update(work, rows, x_rows)` (a single-token op over B work slots) for each
    of the J tokens of every request, on a copy of each request's state; the outputs go
    to `out` [T+1, ...] at write_rows (row T: dump). -> the states [B, J, *state]."""
    work = state[state_slots.long()]
    B = work.shape[0]
    hist = work.new_empty(B, steps.num_steps, *work.shape[1:])
    local = torch.arange(B, device=x.device, dtype=torch.int32)
    for j in range(steps.num_steps):
        out[steps.write_rows[j]] = update(work, local, steps.read_rows[j])
        hist[:, j] = work
    return hist


def conv_steps(steps: VerifySteps, xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               conv_state: torch.Tensor, state_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return run_token_by_token(steps, xbc, conv_state, state_slots, out,
                              lambda work, local, r: causal_conv1d_update(xbc[r], weight, bias, work, local))


def ssm_steps(steps: VerifySteps, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, ssm_state: torch.Tensor,
              state_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return run_token_by_token(steps, x, ssm_state, state_slots, out,
                              lambda work, local, r: selective_state_update(work, x[r], dt[r], A, B[r], C[r], D,
                                                                            dt_bias, local))


def commit_states(layers, steps: VerifySteps, state_slots: torch.Tensor, emitted: torch.Tensor,
                  scratch_slot: int) -> None:
    """Each drafting request's slot takes, in every layer, the state after its token
    `emitted - 1` (requests without drafts: their slot is already right; they write
    to the scratch slot)."""
    B = state_slots.shape[0]
    keep = steps.drafting & (emitted > 0)
    dest = torch.where(keep, state_slots, torch.full_like(state_slots, scratch_slot)).long()
    pick = (emitted.long() - 1).clamp(min=0, max=steps.num_steps - 1)
    local = torch.arange(B, device=state_slots.device)
    for layer, (conv, ssm) in zip(layers, steps.history):
        layer.conv_state[dest] = conv[local, pick]
        layer.ssm_state[dest] = ssm[local, pick]
    steps.history.clear()
