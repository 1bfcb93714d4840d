"""A step's sampled tokens (and logprobs) on their way to the host.

The runner launches the step and starts a non-blocking device-to-host copy of the
sampled tokens into pinned memory, recording a CUDA event after it; the engine core
calls `result()` one step later (async scheduling) or at once (sync). That copy is the
only device-to-host traffic of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)          # requests that produced a token
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    # Prompt logprobs computed this step: request -> (position of the prompt token, its entry).
    prompt_logprobs: dict[str, list[tuple[int, dict[int, float]]]] = field(default_factory=dict)
    # Speculative decoding: every token a request got this step (accepted drafts, then
    # the correction or bonus token); `sampled` holds the first of them, and
    # `spec_logprobs` one entry per token for requests that want logprobs.
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to (pinned) host memory without waiting."""
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


class PendingOutput:
    def __init__(self, req_ids: list[str] | None = None, samples: np.ndarray | None = None,
                 want_logprobs: np.ndarray | None = None, sampled: torch.Tensor | None = None,
                 logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 prompt_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray, tuple[torch.Tensor, ...]] | None = None,
                 on_result=None, logprob_rows: np.ndarray | None = None) -> None:
        """`sampled` is [B], or [B, K+1] with -1 after each row's last token (speculative
        decoding: then `logprobs` has a row per token a request may emit, its first at
        `logprob_rows`); `on_result(output)` runs once the output is built."""
        self.req_ids = req_ids or []
        self.samples = samples
        self.want = want_logprobs
        self._sampled = to_host(sampled) if sampled is not None else None
        self._logprobs = tuple(to_host(x) for x in logprobs) if logprobs is not None else None
        # Prompt logprobs: (batch entry, prompt position and top-n of each, then on the
        # device the prompt tokens, their logprobs, top ids and top logprobs).
        self._prompt = None
        if prompt_logprobs is not None:
            entry, pos, n, tensors = prompt_logprobs
            self._prompt = (entry, pos, n, tuple(to_host(x) for x in tensors))
        self._event = None
        if sampled is not None and sampled.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._result: RunnerOutput | None = None
        self._on_result = on_result
        self._logprob_rows = logprob_rows

    def result(self) -> RunnerOutput:
        """Wait for the copy (a no-op when it is done) and build the per-request output."""
        if self._result is not None:
            return self._result
        out = RunnerOutput()
        if self._sampled is not None:
            if self._event is not None:
                self._event.synchronize()
            tokens = self._sampled.tolist()
            if self._logprobs is not None:
                lp, top_ids, top_lps = (x.tolist() for x in self._logprobs)
            for i in np.flatnonzero(self.samples).tolist():
                rid = self.req_ids[i]
                n = int(self.want[i])

                def entry(row: int, token: int) -> dict[int, float]:
                    d = dict(zip(top_ids[row][:n], top_lps[row][:n]))
                    d[token] = lp[row]
                    return d
                if isinstance(tokens[i], list):
                    got = out.spec_tokens[rid] = [x for x in tokens[i] if x >= 0]
                    out.sampled[rid] = got[0]
                    if n >= 0:
                        first = int(self._logprob_rows[i])
                        out.spec_logprobs[rid] = [entry(first + j, x) for j, x in enumerate(got)]
                    continue
                out.sampled[rid] = tokens[i]
                if n >= 0:
                    out.logprobs[rid] = entry(i, tokens[i])
        if self._prompt is not None:
            if self._event is not None:
                self._event.synchronize()
            entry, pos, want, tensors = self._prompt
            tok, lp, top_ids, top_lps = (x.tolist() for x in tensors)
            for k, (i, p, n) in enumerate(zip(entry.tolist(), pos.tolist(), want.tolist())):
                d = dict(zip(top_ids[k][:n], top_lps[k][:n]))
                d[tok[k]] = lp[k]
                out.prompt_logprobs.setdefault(self.req_ids[i], []).append((p, d))
        self._result = out
        if self._on_result is not None:
            self._on_result(out)
        self._sampled = self._logprobs = self._prompt = None
        return out
