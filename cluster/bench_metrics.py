"""The figures of a `tandem bench serve` run, under `vllm bench serve`'s result keys
(`completed`, `request_goodput`, `mean_ttft_ms`, `p99_itl_ms`, ...) and printed in its
table, so scripts that read vLLM's JSON read ours."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GOODPUT_KEYS = ("ttft", "tpot", "e2el")           # vLLM's; ITL is not a per-request figure
PERCENTILE_METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                      "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0                 # seconds
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0              # end to end, seconds
    prompt_len: int = 0
    output_len: int = 0
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else 0.0


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`ttft:500 tpot:50 e2el:3000` (milliseconds) -> {"ttft": 500.0, ...}."""
    slos = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise SystemExit(f"--goodput {item!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise SystemExit(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[key] < 0:
            raise SystemExit(f"--goodput {item!r}: milliseconds must be >= 0")
    return slos


def percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def is_good(r: Result, slos: dict[str, float]) -> bool:
    """Meets every SLO given (<=), as vLLM counts it."""
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    return all(values[k] * 1000 <= ms for k, ms in slos.items())


def summarize(results: list[Result], duration: float, slos: dict[str, float],
              metrics: list[str], percentiles: list[float]) -> dict:
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    summary = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": sum(is_good(r, slos) for r in ok) / duration if slos else None,
        "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
        "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "generated_texts": [r.text for r in results], "errors": [r.error for r in results],
    }
    samples = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.output_len > 1],
               "itl": [g for r in ok for g in r.itl], "e2el": [r.latency for r in ok]}
    for name in metrics:
        ms = np.asarray(samples[name], dtype=float) * 1000.0
        summary[f"mean_{name}_ms"] = float(ms.mean()) if ms.size else 0.0
        summary[f"median_{name}_ms"] = float(np.median(ms)) if ms.size else 0.0
        summary[f"std_{name}_ms"] = float(ms.std()) if ms.size else 0.0
        for p in percentiles:
            summary[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else 0.0
    return summary


def report(s: dict, metrics: list[str], percentiles: list[float], max_concurrency: int | None,
           request_rate: float, slos: dict[str, float]) -> str:
    line = lambda k, v: f"{k:<40}{v:<10}"  # noqa: E731
    rows = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
            line("Successful requests:", s["completed"]), line("Failed requests:", s["failed"])]
    if max_concurrency is not None:
        rows.append(line("Maximum request concurrency:", max_concurrency))
    rows += [line("Request rate configured (RPS):", f"{request_rate:.2f}"),
             line("Benchmark duration (s):", f"{s['duration']:.2f}"),
             line("Total input tokens:", s["total_input_tokens"]),
             line("Total generated tokens:", s["total_output_tokens"]),
             line("Request throughput (req/s):", f"{s['request_throughput']:.2f}")]
    if slos:
        rows.append(line("Request goodput (req/s):", f"{s['request_goodput']:.2f}"))
    rows += [line("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
             line("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    for name in metrics:
        short = name.upper()
        rows.append("{s:{c}^50}".format(s=PERCENTILE_METRICS[name], c="-"))
        rows.append(line(f"Mean {short} (ms):", f"{s[f'mean_{name}_ms']:.2f}"))
        rows.append(line(f"Median {short} (ms):", f"{s[f'median_{name}_ms']:.2f}"))
        for p in percentiles:
            word = percentile_word(p)
            rows.append(line(f"P{word} {short} (ms):", f"{s[f'p{word}_{name}_ms']:.2f}"))
    if slos:
        rows.append("Goodput SLOs (ms): " + ", ".join(f"{k} <= {v:g}" for k, v in slos.items()))
    errors = sorted({e for e in s["errors"] if e})
    if errors:
        rows.append("errors: " + "; ".join(errors[:5]))
    rows.append("=" * 50)
    return "\n".join(rows)
