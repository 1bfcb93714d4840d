"""The user's `speculative_config` (vLLM's key names), checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

# The runner verifies K drafts in a (K+1)-token query and lays the head's rows out as
# [stale | valid | K-1 mask] (2K per decoding request); beyond this the batch gets long.
MAX_SPECULATIVE_TOKENS = 15


@dataclass(frozen=True)
class SpecDecodeSettings:
    method: str
    model: str
    num_speculative_tokens: int
    # vLLM's key: False drafts with K sequential passes of the head (a chain drafter,
    # for comparison: the same drafts at K times the head's cost).
    parallel_drafting: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> SpecDecodeSettings:
        if not isinstance(cfg, dict):   # a bad setting like the others: EngineConfig gathers ValueErrors
            raise ValueError("speculative_config must be a dict like {'method': 'peagle', "  # noqa: TRY004
                             "'model': HEAD_FOLDER, 'num_speculative_tokens': K}")
        unknown = set(cfg) - {"method", "model", "num_speculative_tokens", "parallel_drafting"}
        if unknown:
            raise ValueError(f"speculative_config has keys this engine does not know: {sorted(unknown)}")
        method = cfg.get("method", "peagle")
        if method != "peagle":
            raise ValueError(f"speculative_config method {method!r} is not supported; use 'peagle'")
        if not isinstance(cfg.get("model"), str) or not cfg["model"]:
            raise ValueError("speculative_config needs 'model': the folder of a P-EAGLE head")
        k = cfg.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer between 1 and "
                             f"{MAX_SPECULATIVE_TOKENS}, got {k!r}")
        parallel = cfg.get("parallel_drafting", True)
        if not isinstance(parallel, bool):
            raise ValueError(f"speculative_config parallel_drafting must be true or false, got {parallel!r}")
        return cls(method, cfg["model"], k, parallel)
