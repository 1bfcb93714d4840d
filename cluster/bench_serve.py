"""`tandem bench serve`: an open-loop load generator for OpenAI-compatible servers.

Sends `--num-prompts` random-token prompts at `--request-rate` (Poisson; `inf` sends
all at once), streams each completion, and reports TTFT, TPOT, ITL and end-to-end
latency (mean, p50, p90, p99), throughput and goodput (requests/s meeting both SLOs),
laid out as `vllm bench serve` users know it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson), or inf")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-itl-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--result-json", default=None)


async def one(client: httpx.AsyncClient, url: str, body: dict, bar: tqdm) -> Result:
    r = Result(prompt_tokens=len(body["prompt"]))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if not chunk.get("choices"):
                    if chunk.get("usage"):
                        r.output_tokens = chunk["usage"]["completion_tokens"]
                    continue
                if r.ttft == 0.0:
                    r.ttft = now - start
                else:
                    r.itl.append(now - last)
                last = now
        r.e2e = time.perf_counter() - start
        r.ok = True
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        bar.update(1)
    return r


async def drive(ns: argparse.Namespace) -> tuple[list[Result], float, str]:
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    async with httpx.AsyncClient(base_url=ns.base_url, headers=headers, timeout=httpx.Timeout(600.0)) as client:
        model = ns.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        rng = random.Random(ns.seed)
        vocab = 256
        tasks = []
        bar = tqdm(total=ns.num_prompts, desc="requests", unit="req")
        t0 = time.perf_counter()
        for i in range(ns.num_prompts):
            body = {"model": model, "prompt": [rng.randrange(vocab) for _ in range(ns.input_len)],
                    "max_tokens": ns.output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(one(client, "/v1/completions", body, bar)))
            if ns.request_rate != float("inf") and i + 1 < ns.num_prompts:
                await asyncio.sleep(rng.expovariate(ns.request_rate))
        results = await asyncio.gather(*tasks)
        bar.close()
        return results, time.perf_counter() - t0, model


def summarize(ns: argparse.Namespace, results: list[Result], duration: float, model: str) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: np.asarray(xs, dtype=float) * 1000.0  # noqa: E731
    ttft = ms([r.ttft for r in ok])
    tpot = ms([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    itl = ms([g for r in ok for g in r.itl])
    e2e = ms([r.e2e for r in ok])
    mean_itl = {id(r): (np.mean(r.itl) * 1000 if r.itl else 0.0) for r in ok}
    good = [r for r in ok if r.ttft * 1000 <= ns.slo_ttft_ms and mean_itl[id(r)] <= ns.slo_itl_ms]
    out_tokens = sum(r.output_tokens for r in ok)
    stats = lambda a: {"mean": float(a.mean()) if a.size else 0.0,  # noqa: E731
                       **{f"p{p}": float(np.percentile(a, p)) if a.size else 0.0 for p in (50, 90, 99)}}
    return {
        "model": model, "base_url": ns.base_url, "num_prompts": ns.num_prompts, "request_rate": ns.request_rate,
        "input_len": ns.input_len, "output_len": ns.output_len, "duration_s": duration,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "slo_ttft_ms": ns.slo_ttft_ms, "slo_itl_ms": ns.slo_itl_ms,
        "goodput": len(good) / duration,
        "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2el_ms": stats(e2e),
    }


def report(s: dict) -> str:
    line = lambda k, v: f"{k:<40}{v:<10}"  # noqa: E731
    rows = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
            line("Successful requests:", s["completed"]), line("Failed requests:", s["failed"]),
            line("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
            line("Total input tokens:", s["total_input_tokens"]),
            line("Total generated tokens:", s["total_output_tokens"]),
            line("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            line("Request goodput (req/s):", f"{s['goodput']:.2f}"),
            line("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            line("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        short = key.split("_")[0].upper()
        rows.append("{s:{c}^50}".format(s=title, c="-"))
        rows.append(line(f"Mean {short} (ms):", f"{s[key]['mean']:.2f}"))
        for p in (50, 90, 99):
            rows.append(line(f"P{p} {short} (ms):", f"{s[key][f'p{p}']:.2f}"))
    rows.append(f"SLOs: TTFT <= {s['slo_ttft_ms']:.0f} ms, mean ITL <= {s['slo_itl_ms']:.0f} ms")
    if s["errors"]:
        rows.append("errors: " + "; ".join(s["errors"]))
    rows.append("=" * 50)
    return "\n".join(rows)


def run(ns: argparse.Namespace) -> int:
    results, duration, model = asyncio.run(drive(ns))
    summary = summarize(ns, results, duration, model)
    print(report(summary))
    if ns.result_json:
        with open(ns.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["completed"] else 1
