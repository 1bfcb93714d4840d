"""What a request asks of the sampler and the stop logic, validated on construction.

Every field has a range that the engine can hold (the runner's state table keeps top_k
in int32 and seeds in int64) and that means something; the API layer states the same
bounds in its schema (the constants below are the one definition)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1
MAX_SEED = 2**63 - 1          # seeds live in an int64 column
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256   # the detokenizer rescans this much text per token
MAX_STOP_TOKEN_IDS = 256


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1          # -1 (or 0) keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one; sampling stays batch-independent
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs of each generated token (plus the sampled one)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0 and _is_int(self.top_k):
            self.top_k = -1
        problems = []
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            problems.append(f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            problems.append(f"top_k must be -1 (disabled) or an integer in [1, {INT32_MAX}], got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= INT32_MAX):
            problems.append(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            problems.append(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            problems.append(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if (len(self.stop) > MAX_STOP_STRINGS
                or any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop)):
            problems.append(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most "
                            f"{MAX_STOP_STRING_CHARS} characters")
        if (len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS
                or any(not _is_int(t) or not 0 <= t <= INT32_MAX for t in self.stop_token_ids)):
            problems.append(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} token ids >= 0")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
