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
MAX_PENALTY = 2.0             # presence/frequency penalties: OpenAI's range [-2, 2]
MAX_REPETITION_PENALTY = 100.0  # (0, 100]: 1 is off; beyond this every seen token is gone anyway
MAX_LOGIT_BIAS = 100.0        # OpenAI's range for a bias: [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 300  # the runner keeps this many (token, bias) slots per request


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
    # Top-n logprobs of each generated token (plus the sampled one), over the model's
    # distribution after logit_bias and the penalties (as OpenAI's reflect logit_bias).
    logprobs: int | None = None
    # Over the generated tokens' counts (OpenAI's): logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Over prompt and generated tokens (vLLM's): a seen token's logit / r if > 0, else * r.
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit before the penalties
    prompt_logprobs: int | None = None  # top-n logprobs of each prompt token after the first (plus its own)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None and isinstance(self.logit_bias, dict):
            # JSON (and msgpack from JSON) has string keys: "50256" -> 50256.
            self.logit_bias = {int(k) if isinstance(k, str) and k.isdigit() and k.isascii() else k: v
                               for k, v in self.logit_bias.items()} or None
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
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= INT32_MAX):
            problems.append(f"prompt_logprobs must be an integer >= 0, got {self.prompt_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                problems.append(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v!r}")
        if (not _is_number(self.repetition_penalty)
                or not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            problems.append(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] (1 is off), "
                            f"got {self.repetition_penalty!r}")
        if self.logit_bias is not None and (
                not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES
                or any(not _is_int(k) or not 0 <= k <= INT32_MAX or not _is_number(v)
                       or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for k, v in self.logit_bias.items())):
            problems.append(f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to biases in "
                            f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
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

    @property
    def uses_penalties(self) -> bool:
        """Whether the sampler must change this request's logits (bias or penalties)."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 \
            or self.repetition_penalty != 1.0
