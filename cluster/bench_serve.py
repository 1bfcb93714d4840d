"""`tandem bench serve`: a load generator for OpenAI-compatible servers with `vllm bench
serve`'s options, so a user's scripts carry over.

Requests arrive open-loop at --request-rate (gaps from a gamma distribution of shape
--burstiness: 1 is Poisson; `inf` sends all at once), optionally capped at
--max-concurrency in flight. Each completion is streamed; TTFT, TPOT, ITL and end-to-end
latency, throughput and goodput (requests meeting every --goodput SLO) are reported as
vLLM reports them, and --save-result writes vLLM's JSON keys. The old spellings
(--input-len, --output-len, --slo-ttft-ms, --slo-itl-ms, --result-json) still work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from cluster.bench_datasets import Prompt, random_prompts, sharegpt_prompts
from cluster.bench_metrics import PERCENTILE_METRICS, Result, parse_goodput, report, summarize

ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's names; every option says its default."""
    t = p.add_argument_group("target")
    t.add_argument("--backend", default="openai", choices=list(ENDPOINTS),
                   help="openai: /v1/completions; openai-chat: /v1/chat/completions (default: openai)")
    t.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    t.add_argument("--host", default="127.0.0.1", help="server host when no --base-url (default: 127.0.0.1)")
    t.add_argument("--port", type=int, default=8000, help="server port when no --base-url (default: 8000)")
    t.add_argument("--endpoint", default=None, help="API path (default: the backend's, /v1/completions "
                                                      "or /v1/chat/completions)")
    t.add_argument("--model", default=None, help="model name in requests (default: the first of /v1/models)")
    t.add_argument("--tokenizer", default=None, help="tokenizer folder for text prompts and ShareGPT lengths "
                                                      "(default: the embedded model's when the server serves it)")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, else none)")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"],
                   help="random token prompts, or a local ShareGPT JSON file (default: random)")
    d.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file (default: none)")
    d.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default: 1000)")
    d.add_argument("--random-input-len", "--input-len", type=int, default=1024,
                   help="random: prompt tokens (default: 1024)")
    d.add_argument("--random-output-len", "--output-len", type=int, default=128,
                   help="random: output tokens (default: 128)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [len*(1-r), len*(1+r)] (default: 0.0)")
    d.add_argument("--random-prefix-len", type=int, default=0,
                   help="random: tokens of a prefix shared by every prompt (default: 0)")
    d.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt: output tokens of every request (default: the reply's length)")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests/s, or inf to send all at once (default: inf)")
    load.add_argument("--ramp-up-strategy", default=None, choices=["linear", "exponential"],
                      help="move the request rate from --ramp-up-start-rps to --ramp-up-end-rps over the "
                           "run, instead of a fixed --request-rate (default: none)")
    load.add_argument("--ramp-up-start-rps", type=float, default=None, help="ramp: first rate, req/s (default: none)")
    load.add_argument("--ramp-up-end-rps", type=float, default=None, help="ramp: last rate, req/s (default: none)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 steadier (default: 1.0)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="most requests in flight (default: no limit)")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: 0)")
    load.add_argument("--ignore-eos", action="store_true",
                      help="generate exactly the output length (default: off; always on for random)")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0.0)")
    load.add_argument("--disable-tqdm", action="store_true", help="no progress bar (default: shown)")
    r = p.add_argument_group("results")
    r.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs in ms for goodput, keys ttft, tpot, e2el, e.g. ttft:500 tpot:50 (default: none)")
    r.add_argument("--slo-ttft-ms", type=float, default=None, help="old spelling of --goodput ttft:MS (default: none)")
    r.add_argument("--slo-itl-ms", type=float, default=None,
                   help="old spelling of --goodput tpot:MS (a request's mean ITL is its TPOT) (default: none)")
    r.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help=f"metrics to report, of {','.join(PERCENTILE_METRICS)} (default: ttft,tpot,itl)")
    r.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 50,90,99 (default: 99)")
    r.add_argument("--save-result", action="store_true", help="write the results as JSON (default: off)")
    r.add_argument("--result-dir", default=None, help="folder of the JSON file (default: the current one)")
    r.add_argument("--result-filename", default=None,
                   help="JSON file name (default: BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)")
    r.add_argument("--result-json", default=None, help="old spelling of --save-result --result-filename FILE "
                                                       "(default: none)")
    r.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra KEY=VALUE pairs stored in the JSON (default: none)")


def settings(ns: argparse.Namespace) -> tuple[dict[str, float], list[str], list[float]]:
    slos = parse_goodput(ns.goodput)
    if ns.slo_ttft_ms is not None:
        slos.setdefault("ttft", ns.slo_ttft_ms)
    if ns.slo_itl_ms is not None:
        slos.setdefault("tpot", ns.slo_itl_ms)
    metrics = [m.strip() for m in ns.percentile_metrics.split(",") if m.strip()]
    bad = set(metrics) - set(PERCENTILE_METRICS)
    if bad:
        raise SystemExit(f"--percentile-metrics: unknown {', '.join(sorted(bad))} (known: {', '.join(PERCENTILE_METRICS)})")
    try:
        percentiles = [float(p) for p in ns.metric_percentiles.split(",")]
    except ValueError:
        raise SystemExit(f"--metric-percentiles {ns.metric_percentiles!r}: expected numbers like 50,99") from None
    if any("=" not in item for item in ns.metadata):
        raise SystemExit(f"--metadata: expected KEY=VALUE pairs, got {ns.metadata}")
    if ns.burstiness <= 0 or ns.request_rate <= 0:
        raise SystemExit("--burstiness and --request-rate must be > 0")
    if ns.ramp_up_strategy and not (ns.ramp_up_start_rps and ns.ramp_up_end_rps
                                    and ns.ramp_up_start_rps > 0 and ns.ramp_up_end_rps > 0):
        raise SystemExit("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps, both > 0")
    return slos, metrics, percentiles


def tokenizer_for(ns: argparse.Namespace, model: str):
    from engine.tokenizer import load_tokenizer
    if ns.tokenizer:
        return load_tokenizer(ns.tokenizer)
    if model == "tandem-default":
        from engine.default_model import default_model_path
        return load_tokenizer(default_model_path())
    return None


def build_prompts(ns: argparse.Namespace, model: str) -> list[Prompt]:
    rng = random.Random(ns.seed)
    chat = ns.backend == "openai-chat"
    if ns.dataset_name == "sharegpt":
        if not ns.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path FILE (a local ShareGPT JSON)")
        return sharegpt_prompts(ns.dataset_path, ns.num_prompts, rng, tokenizer_for(ns, model), ns.sharegpt_output_len)
    tokenizer = tokenizer_for(ns, model) if chat else None
    return random_prompts(ns.num_prompts, ns.random_input_len, ns.random_output_len, ns.random_range_ratio,
                          ns.random_prefix_len, rng, tokenizer, as_text=chat)


def request_body(ns: argparse.Namespace, model: str, p: Prompt) -> dict:
    body = {"model": model, "max_tokens": p.output_len, "temperature": ns.temperature, "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": ns.ignore_eos or ns.dataset_name == "random"}
    if ns.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": p.prompt}]
    else:
        body["prompt"] = p.prompt
    return body


async def one(client: httpx.AsyncClient, url: str, body: dict, prompt: Prompt, bar: tqdm | None) -> Result:
    r = Result(prompt_len=prompt.prompt_len or 0)
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
                if chunk.get("usage"):
                    r.output_len = chunk["usage"]["completion_tokens"]
                    r.prompt_len = prompt.prompt_len or chunk["usage"]["prompt_tokens"]
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                r.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if r.ttft == 0.0:
                    r.ttft = now - start
                else:
                    r.itl.append(now - last)
                last = now
        r.latency = time.perf_counter() - start
        r.ok = True
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        if bar is not None:
            bar.update(1)
    return r


async def drive(ns: argparse.Namespace) -> tuple[list[Result], float, str]:
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    base_url = ns.base_url or f"http://{ns.host}:{ns.port}"
    endpoint = ns.endpoint or ENDPOINTS[ns.backend]
    limits = httpx.Limits(max_connections=ns.max_concurrency) if ns.max_concurrency else httpx.Limits()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(600.0),
                                 limits=limits) as client:
        model = ns.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = build_prompts(ns, model)
        gaps = np.random.default_rng(ns.seed)
        gate = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None
        bar = None if ns.disable_tqdm else tqdm(total=len(prompts), desc="requests", unit="req")

        async def limited(p: Prompt) -> Result:
            if gate is None:
                return await one(client, endpoint, request_body(ns, model, p), p, bar)
            async with gate:
                return await one(client, endpoint, request_body(ns, model, p), p, bar)

        tasks = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(p)))
            rate = request_rate(ns, i, len(prompts))
            if rate != float("inf") and i + 1 < len(prompts):
                # Gamma gaps of mean 1/rate; shape 1 is exponential (Poisson arrivals).
                await asyncio.sleep(gaps.gamma(ns.burstiness, 1.0 / (rate * ns.burstiness)))
        results = await asyncio.gather(*tasks)
        if bar is not None:
            bar.close()
        return results, time.perf_counter() - t0, model


def request_rate(ns: argparse.Namespace, i: int, n: int) -> float:
    """The rate before request i+1 of n: fixed, or on the ramp (vLLM's strategies)."""
    if not ns.ramp_up_strategy:
        return ns.request_rate
    progress = i / max(1, n - 1)
    start, end = ns.ramp_up_start_rps, ns.ramp_up_end_rps
    if ns.ramp_up_strategy == "linear":
        return start + (end - start) * progress
    return start * (end / start) ** progress


def result_path(ns: argparse.Namespace, model: str, date: str) -> Path:
    if ns.result_json:
        return Path(ns.result_json)
    rate = "inf" if ns.request_rate == float("inf") else f"{ns.request_rate:g}"
    concurrency = f"-concurrency{ns.max_concurrency}" if ns.max_concurrency else ""
    name = ns.result_filename or f"{ns.backend}-{rate}qps{concurrency}-{Path(model).name}-{date}.json"
    return Path(ns.result_dir or ".") / name


def run(ns: argparse.Namespace) -> int:
    slos, metrics, percentiles = settings(ns)
    results, duration, model = asyncio.run(drive(ns))
    summary = summarize(results, duration, slos, metrics, percentiles)
    print(report(summary, metrics, percentiles, ns.max_concurrency, ns.request_rate, slos))
    if ns.save_result or ns.result_json:
        date = datetime.now().strftime("%Y%m%d-%H%M%S")
        document = {"date": date, "backend": ns.backend, "endpoint_type": ns.backend, "model_id": model,
                    "tokenizer_id": ns.tokenizer or model, "dataset_name": ns.dataset_name,
                    "num_prompts": ns.num_prompts,
                    "request_rate": "inf" if ns.request_rate == float("inf") else ns.request_rate,
                    "burstiness": ns.burstiness, "max_concurrency": ns.max_concurrency,
                    "ramp_up_strategy": ns.ramp_up_strategy, "ramp_up_start_rps": ns.ramp_up_start_rps,
                    "ramp_up_end_rps": ns.ramp_up_end_rps,
                    "goodput_slos_ms": slos or None,
                    **dict(item.split("=", 1) for item in ns.metadata), **summary}
        path = result_path(ns, model, date)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        print(f"results written to {path}")
    return 0 if summary["completed"] else 1
