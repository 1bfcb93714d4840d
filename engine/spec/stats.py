"""Speculative-decoding counters kept by the engine core (for tandem_spec_decode_*)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0             # verification rounds (requests x steps with drafts)
    num_draft_tokens: int = 0       # drafts verified
    num_accepted_tokens: int = 0    # drafts accepted
    accepted_per_position: list[int] = field(default_factory=list)   # [k]: rounds that accepted d_{k+1}

    def observe(self, drafted: dict[str, int], tokens: dict[str, list[int]]) -> None:
        """One step: drafts verified per request and the tokens each got (accepted + 1)."""
        for rid, k in drafted.items():
            got = tokens.get(rid)
            if got is None:     # preempted or finished while in flight
                continue
            accepted = len(got) - 1
            self.num_drafts += 1
            self.num_draft_tokens += k
            self.num_accepted_tokens += accepted
            if len(self.accepted_per_position) < k:
                self.accepted_per_position += [0] * (k - len(self.accepted_per_position))
            for pos in range(accepted):
                self.accepted_per_position[pos] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification round: 1 + accepted drafts (the bonus token counts)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> SpecDecodeStats:
        """A copy another thread may read while the engine goes on counting."""
        return replace(self, accepted_per_position=list(self.accepted_per_position))

    def as_metrics(self) -> dict[str, float | dict[str, float]]:
        """vLLM's spec-decode counters (without the tandem_ prefix); the per-position one
        is labelled `position` (0: the first draft)."""
        return {"spec_decode_num_drafts_total": self.num_drafts,
                "spec_decode_num_draft_tokens_total": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens_total": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos_total": {
                    str(i): n for i, n in enumerate(self.accepted_per_position)}}
