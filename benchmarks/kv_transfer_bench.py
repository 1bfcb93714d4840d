"""KV hand-off benchmark: READs of KV blocks between two engines' caches through the
NIXL connector (the same code path as serving: hold -> handle -> start_load -> poll).

    python benchmarks/kv_transfer_bench.py [--device cpu|cuda] [--out FILE] [--quick]

The producer runs in its own process (as prefill and decode engines do when serving;
UCX picks its inter-process paths, e.g. cuda_ipc between GPUs). For each cache shape (a
real model's KV block, see benchmarks/shapes/) and block count, times the READ of a
request's blocks laid out two ways: adjacent block ids (what a fresh
pool hands out; one descriptor per run) and scattered ids (one descriptor per block),
and reports GB/s against a plain copy of the same bytes measured in the same run
(CPU: memcpy in DRAM; CUDA: GPU0 -> GPU1 copy when two GPUs are present, else on one).
Each result is a JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disagg.nixl_connector import NixlConnector  # noqa: E402
from engine.kv_transfer_params import KVTransferParams  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

# (name, layers, entries, heads, dim): per-block KV shapes of the benchmark models.
SHAPES = [("qwen3-30b-a3b", 48, 2, 4, 128), ("deepseek-v2-lite", 27, 1, 1, 576)]
BLOCK = 16


def emit(out: Path | None, **rec) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def copy_gbs(nbytes: int, src_dev: str, dst_dev: str) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_dev).random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)
    times = []
    for i in range(8):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def sync() -> None:
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def producer_process(conn, shape: tuple, dtype: str, device: str, model: str) -> None:
    """The prefill side, in its own process as in serving: a cache with random KV that
    lends blocks under a lease on request."""
    a = torch.zeros(shape, dtype=getattr(torch, dtype), device=device).normal_()
    producer = NixlConnector(a, model, lease_s=600)
    conn.send(producer.layout.block_bytes)
    while True:
        while not conn.poll(0.0005):
            producer.released()     # drives the producer's side of transfers (and frees leases)
        if (cmd := conn.recv()) is None:
            break
        tag, src = cmd
        req = Request(tag, [1] * (len(src) * BLOCK), SamplingParams(max_tokens=2))
        conn.send((producer.hold(req, src), float(a[src].double().sum())))
    producer.close()


def read_once(conn, consumer: NixlConnector, src: list[int], dst: list[int], tag: str):
    """One request's hand-off: (seconds from start_load to done, descriptors, checksum
    of the producer's blocks)."""
    conn.send((tag, src))
    handle, checksum = conn.recv()
    req = Request(tag, [1] * (len(src) * BLOCK), SamplingParams(max_tokens=2),
                  kv_transfer_params=KVTransferParams(do_remote_prefill=True, handle=handle))
    before = consumer.stats.descriptors_total
    t0 = time.perf_counter()
    consumer.start_load(req, dst, 0)
    while True:
        done, failed = consumer.finished_loads()
        if failed:
            raise RuntimeError(failed)
        if done:
            break
    return time.perf_counter() - t0, consumer.stats.descriptors_total - before, checksum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="small counts (CI smoke)")
    ns = ap.parse_args()
    two_gpus = ns.device == "cuda" and torch.cuda.device_count() >= 2
    src_dev, dst_dev = ("cuda:0", "cuda:1") if two_gpus else (ns.device, ns.device)
    counts = [1, 8] if ns.quick else [1, 8, 64, 256]
    dtype = "float32" if ns.device == "cpu" else "bfloat16"
    emit(ns.out, kind="setup", device=ns.device, src=src_dev, dst=dst_dev, processes=2,
         gpu=torch.cuda.get_device_name(0) if ns.device == "cuda" else None, torch=torch.__version__,
         date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    rng = random.Random(0)
    ctx = mp.get_context("spawn")
    for name, layers, entries, heads, dim in SHAPES:
        n_blocks = 2 * max(counts) + 8
        shape = (n_blocks, layers, entries, BLOCK, heads, dim)
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=producer_process, args=(child, shape, dtype, src_dev, name), daemon=True)
        proc.start()
        block_bytes = conn.recv()
        b = torch.zeros(shape, dtype=getattr(torch, dtype), device=dst_dev)
        consumer = NixlConnector(b, name)
        read_once(conn, consumer, [0], [0], f"{name}-warm")     # handshake + connection
        for count in counts:
            for layout in ("adjacent", "scattered"):
                if layout == "adjacent":
                    src, dst = list(range(count)), list(range(n_blocks - count, n_blocks))
                else:
                    src = rng.sample(range(0, n_blocks, 2), count)      # never adjacent
                    dst = rng.sample(range(1, n_blocks, 2), count)
                times = []
                for i in range(5):
                    seconds, descs, checksum = read_once(conn, consumer, src, dst, f"{name}-{count}-{layout}-{i}")
                    times.append(seconds)
                sync()
                got = float(b[dst].double().sum())
                assert abs(got - checksum) <= 1e-6 * max(1.0, abs(checksum)), "READ delivered wrong bytes"
                med = sorted(times)[len(times) // 2]
                nbytes = count * block_bytes
                emit(ns.out, kind="read", shape=name, blocks=count, tokens=count * BLOCK, layout=layout,
                     descriptors=descs, mib=round(nbytes / 2**20, 2), median_ms=round(med * 1e3, 3),
                     best_ms=round(min(times) * 1e3, 3), gbs=round(nbytes / med / 1e9, 2),
                     copy_gbs=round(copy_gbs(nbytes, src_dev, dst_dev), 1))
        conn.send(None)
        proc.join(30)
        consumer.close()
        del b


if __name__ == "__main__":
    main()
