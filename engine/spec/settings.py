"""The user's `speculative_config` (vLLM's key names), checked once at start-up, and the
rule by which K shrinks as the batch grows (`num_speculative_tokens_per_batch`)."""

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
    # vLLM's key: False drafts with K sequential passes of the head (EAGLE's chain
    # drafter, each draft and the head's own hidden state fed to the next pass; for
    # comparison: a P-EAGLE head is not trained for it).
    parallel_drafting: bool = True
    # ((min_batch, k), ...), min_batch increasing, k decreasing: from `min_batch` running
    # requests on, each decoding request verifies k drafts (below the first, K). Large
    # decode batches make verification compute-bound, where a rejected draft costs a
    # full token of target compute; () keeps K at every batch size.
    num_speculative_tokens_per_batch: tuple[tuple[int, int], ...] = ()

    def drafts_at(self, batch: int) -> int:
        return drafts_at(self.num_speculative_tokens, self.num_speculative_tokens_per_batch, batch)

    @property
    def draft_counts(self) -> list[int]:
        """Every K the rule can give (the runner captures graphs for each)."""
        return [self.num_speculative_tokens, *(k for _, k in self.num_speculative_tokens_per_batch)]

    @classmethod
    def from_dict(cls, cfg: dict) -> SpecDecodeSettings:
        if not isinstance(cfg, dict):   # a bad setting like the others: EngineConfig gathers ValueErrors
            raise ValueError("speculative_config must be a dict like {'method': 'peagle', "  # noqa: TRY004
                             "'model': HEAD_FOLDER, 'num_speculative_tokens': K}")
        unknown = set(cfg) - {"method", "model", "num_speculative_tokens", "parallel_drafting",
                          "num_speculative_tokens_per_batch"}
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
        return cls(method, cfg["model"], k, parallel,
                   _per_batch_rule(cfg.get("num_speculative_tokens_per_batch") or (), k))


def drafts_at(k: int, rule: tuple[tuple[int, int], ...], batch: int) -> int:
    """Drafts per decoding request at `batch` running requests: the k of the last rule
    entry whose min_batch <= batch, else K."""
    for min_batch, k_at in rule:
        if batch < min_batch:
            break
        k = k_at
    return k


def _per_batch_rule(rule, k: int) -> tuple[tuple[int, int], ...]:
    example = "e.g. [[16, 3], [64, 1]]: from 16 running requests 3 drafts each, from 64 on 1"
    if not isinstance(rule, (list, tuple)) or not all(
            isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in e) for e in rule):
        raise ValueError(f"speculative_config num_speculative_tokens_per_batch must be a list of "
                         f"[min_batch, num_speculative_tokens] pairs ({example}), got {rule!r}")
    pairs = tuple((int(b), int(n)) for b, n in rule)
    prev_b, prev_k = 1, k
    for b, n in pairs:
        if b <= prev_b:
            raise ValueError(f"speculative_config num_speculative_tokens_per_batch: batch thresholds must be "
                             f"increasing and above 1, got {[p[0] for p in pairs]} ({example})")
        if not 1 <= n < prev_k:
            raise ValueError(f"speculative_config num_speculative_tokens_per_batch: the drafts per request must "
                             f"shrink as the batch grows, each at least 1 and below num_speculative_tokens={k} and "
                             f"the entry before; got {[p[1] for p in pairs]} ({example})")
        prev_b, prev_k = b, n
    return pairs
