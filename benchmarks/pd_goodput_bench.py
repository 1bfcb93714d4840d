"""Goodput of disaggregated prefill/decode against colocated serving, with the same
number of engines and the same load, in one process (no HTTP, no Ray: what differs
between the two runs is only the topology).

    python benchmarks/pd_goodput_bench.py [--model default|qwen3-30b-a3b|deepseek-v2-lite]
        [--rates 1,2,4] [--num-prompts 32] [--input-len 1024] [--output-len 128]
        [--slo-ttft-ms 2000] [--slo-itl-ms 100] [--out FILE]

colocated: two engines in two processes, each taking half of the arrivals.
pd: a prefill engine in its own process (behind a PrefillService) and a decode engine,
KV through the NIXL connector. On CUDA with two GPUs each engine gets its own GPU. Requests arrive as a Poisson process
at each rate (random prompt ids, greedy, ignore EOS). A request meets the SLOs when its
TTFT and its mean inter-token latency are under the thresholds; attainment is the share
that meets both. Each result is a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import config_dir  # noqa: E402
from disagg.connector import connector_spec  # noqa: E402
from disagg.prefill_decode import PrefillDecodeEngine  # noqa: E402
from disagg.prefill_service import PrefillClient, PrefillService  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def engine_config(ns, device: str) -> EngineConfig:
    kw = dict(device=device, max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
              max_model_len=ns.input_len + ns.output_len + 16, seed=0)
    if ns.model == "default":
        return EngineConfig(model="default", **kw)
    return EngineConfig(model=str(config_dir(ns.model, smoke=False)), dtype="bfloat16", load_format="random", **kw)


def devices(ns) -> tuple[str, str]:
    if ns.device == "cuda":
        return ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cuda:0", "cuda:0")
    return "cpu", "cpu"


async def one(front, ids: list[int], n: int, rid: str) -> dict:
    t0 = time.perf_counter()
    stamps = []
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    async for delta in front.generate(ids, params, rid):
        now = time.perf_counter()
        stamps += [now] * len(delta.new_token_ids)
    gaps = np.diff(stamps) if len(stamps) > 1 else np.zeros(0)
    return {"ttft": stamps[0] - t0, "itl_mean": float(gaps.mean()) if gaps.size else 0.0,
            "gaps": gaps.tolist(), "tokens": len(stamps)}


async def load(front, ns, rate: float, n: int, vocab: int, tag: str, seed: int) -> tuple[list[dict], float]:
    """Poisson arrivals of n requests at `rate`; returns per-request results, duration."""
    rng = random.Random(seed)
    tasks, t0 = [], time.perf_counter()
    for i in range(n):
        ids = [rng.randrange(10, vocab - 10) for _ in range(ns.input_len)]
        tasks.append(asyncio.create_task(one(front, ids, ns.output_len, f"{tag}-{rate}-{i}")))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def summarize(ns, results: list[dict], duration: float) -> dict:
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    itl = np.array([g for r in results for g in r["gaps"]]) * 1e3
    meets = lambda r, itl_ms: r["ttft"] * 1e3 <= ns.slo_ttft_ms and r["itl_mean"] * 1e3 <= itl_ms  # noqa: E731
    good = sum(meets(r, ns.slo_itl_ms) for r in results)
    # Attainment at other ITL thresholds, same TTFT threshold (the SLO is a choice).
    by_itl = {str(int(x)): round(sum(meets(r, x) for r in results) / len(results), 3) for x in ns.itl_grid}
    pct = lambda a, p: round(float(np.percentile(a, p)), 1) if a.size else None  # noqa: E731
    return {"requests": len(results), "duration_s": round(duration, 2),
            "slo_attainment": round(good / len(results), 3), "goodput_rps": round(good / duration, 3),
            "attainment_by_itl_slo_ms": by_itl, "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "output_tok_s": round(sum(r["tokens"] for r in results) / duration, 1)}


# -- colocated: one engine per process, each taking half of the arrivals ------------------
def colocated_worker(conn, ns, device: str, index: int) -> None:
    async def main() -> None:
        engine = AsyncEngine(engine_config(ns, device), max_waiting=4 * ns.num_prompts)
        vocab = engine.core.model.config.vocab_size
        await load(engine, ns, 100.0, 2, vocab, "warm", seed=index)
        conn.send("ready")
        while (rate := conn.recv()) is not None:
            # Thinning a Poisson process gives Poisson processes: half the rate each.
            conn.send(await load(engine, ns, rate / 2, ns.num_prompts // 2, vocab, f"co{index}",
                                 seed=hash((index, rate)) & 0xFFFF))
        engine.shutdown()
    asyncio.run(main())


def run_colocated(ns) -> None:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i, dev in enumerate(devices(ns)):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=colocated_worker, args=(child, ns, dev, i), daemon=True))
        procs[-1].start()
        pipes.append(parent)
    for p in pipes:
        assert p.recv() == "ready"
    for rate in ns.rates:
        for p in pipes:
            p.send(rate)
        parts = [p.recv() for p in pipes]
        results = [r for part, _ in parts for r in part]
        emit(ns, kind="goodput", mode="colocated", model=ns.model, rate=rate, **common(ns),
             **summarize(ns, results, max(d for _, d in parts)))
    for p in pipes:
        p.send(None)
    for proc in procs:
        proc.join(60)


# -- pd: the prefill engine in its own process behind a PrefillService ---------------------
def prefill_worker(conn, ns, device: str) -> None:
    async def main() -> None:
        engine = AsyncEngine(engine_config(ns, device), max_waiting=4 * ns.num_prompts,
                             kv_transfer=connector_spec())
        service = PrefillService(engine)
        conn.send(service.address)
        await service.serve_forever()
    asyncio.run(main())


def run_pd(ns) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    d0, d1 = devices(ns)
    proc = ctx.Process(target=prefill_worker, args=(child, ns, d0), daemon=True)
    proc.start()
    address = parent.recv()

    async def main() -> None:
        decode = AsyncEngine(engine_config(ns, d1), max_waiting=4 * ns.num_prompts,
                             kv_transfer=connector_spec())
        client = PrefillClient(address, timeout_s=120)
        front = PrefillDecodeEngine(decode, client)
        vocab = decode.core.model.config.vocab_size
        await load(front, ns, 100.0, 2, vocab, "warm", seed=7)
        for rate in ns.rates:
            results, duration = await load(front, ns, rate, ns.num_prompts, vocab, "pd", seed=hash(rate) & 0xFFFF)
            emit(ns, kind="goodput", mode="pd", model=ns.model, rate=rate, **common(ns),
                 **summarize(ns, results, duration))
        stats = decode.kv_transfer.stats
        durations = sorted(stats.durations)
        emit(ns, kind="kv_transfer", transfers=stats.transfers_total, bytes=stats.bytes_total,
             descriptors=stats.descriptors_total, failures=dict(stats.failures), local_prefills=front.num_local_prefills,
             median_ms=round(durations[len(durations) // 2] * 1e3, 3) if durations else None,
             gbs=round(stats.bytes_total / sum(durations) / 1e9, 2) if durations else None)
        client.close()
        decode.shutdown()
    asyncio.run(main())
    proc.kill()


def common(ns) -> dict:
    return dict(device=ns.device, input_len=ns.input_len, output_len=ns.output_len,
                slo_ttft_ms=ns.slo_ttft_ms, slo_itl_ms=ns.slo_itl_ms)


def emit(ns, **rec) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if ns.out is not None:
        with ns.out.open("a") as f:
            f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="colocated,pd")
    ap.add_argument("--rates", default="1,2,4", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--slo-ttft-ms", type=float, default=2000)
    ap.add_argument("--slo-itl-ms", type=float, default=100)
    ap.add_argument("--itl-grid", default="50,75,100,150", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()
    emit(ns, kind="setup", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
         gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], args=sys.argv[1:])
    for mode in ns.modes.split(","):
        {"colocated": run_colocated, "pd": run_pd}[mode](ns)


if __name__ == "__main__":
    main()
