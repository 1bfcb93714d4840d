"""What the scheduler tells the runner for one step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request entering the runner's state table (new, or resumed after preemption)."""
    req_id: str
    token_ids: list[int]          # every known token: prompt, then output so far
    num_computed_tokens: int      # prefix-cache hits
    block_ids: list[list[int]]    # per cache group
    sampling_params: SamplingParams
    seed: int
    num_prompt_tokens: int = 0    # token_ids[:num_prompt_tokens] is the prompt


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData] = field(default_factory=list)
    # Blocks appended to running requests this step, per cache group.
    new_block_ids: dict[str, list[list[int]]] = field(default_factory=dict)
    # Tokens to compute per request, in batch order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests whose rows the runner must drop before this step (finished, aborted, preempted).
    finished_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: drafts verified this step per request (its query is the last
    # sampled token plus these drafts, which the runner keeps on the device); absent = 0.
    spec_token_counts: dict[str, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
