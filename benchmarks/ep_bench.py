"""Expert-parallel dispatch/combine: time per MoE layer call and payload throughput.

One process per rank (gloo on CPU, NCCL when run with --device cuda on a GPU host);
each rank routes `tokens` tokens to top-k of E experts spread evenly over the ranks
and runs ExpertParallel.forward. Modes:
  comm   normal dispatch, experts return their input: three all-to-alls (counts, token
         rows with slot/weight metadata, outputs back) and the host read of the counts;
  moe    normal dispatch with the real fused MoE on each rank's slots (inter --inter);
  ll     the low-latency dispatch (engine/layers/ep_low_latency.py: peer-mapped buffers
         of --ll-capacity tokens per rank, two barriers, fused MoE writing back into the
         peers), one call at a time; also reports its largest difference from `moe`;
  ll-graph  the same, --graph-layers calls captured in one CUDA graph and replayed
         (how a decode step runs them); time per call = replay time / layers.
Payload = token rows out and back (tokens * k * hidden * bytes * 2) plus metadata, per
rank; GB/s is that over the median time.

--rebalance adds serving runs: an ElasticEPEngine (random weights at the shape given
by --engine-*, dispatch from --engine-dispatch; low_latency runs its decode steps as
CUDA graphs on GPU) decodes a batch while a forced rebalance moves every MoE layer's
experts, one layer per step; it reports the decode step time before, during and after,
the bytes moved and the rebalance time.

Run: .venv/bin/python benchmarks/ep_bench.py [--ranks 2 4] [--rebalance] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.distributed.peer_memory import allocate_peer_memory  # noqa: E402
from engine.layers.ep_dispatch import ExpertParallel, attach_expert_parallel  # noqa: E402
from engine.layers.ep_low_latency import LowLatencyBuffers  # noqa: E402
from engine.layers.moe import FusedMoE  # noqa: E402


class _CommOnly(ExpertParallel):
    def compute(self, moe, rows, local_slots, weights):
        return rows


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    results = []
    try:
        normal_out = {}
        for mode in args.modes:
            torch.manual_seed(0)
            with torch.device(device):
                moe = FusedMoE(args.experts, args.hidden, args.inter).to(dtype)
                moe.w13.normal_(0, args.hidden ** -0.5)
                moe.w2.normal_(0, args.inter ** -0.5)
            cls = _CommOnly if mode == "comm" else ExpertParallel
            ep = cls(rank, world, args.experts // world)
            attach_expert_parallel([moe], ep, None)
            if mode.startswith("ll"):
                shape = (world, args.ll_capacity, args.hidden, args.topk, dtype)
                memory = allocate_peer_memory(LowLatencyBuffers.nbytes(*shape), device, None, 60)
                ep.low_latency = LowLatencyBuffers(memory, *shape[1:])
            for tokens in args.tokens:
                g = torch.Generator().manual_seed(rank)
                x = torch.randn(tokens, args.hidden, generator=g).to(device, dtype)
                ids = torch.rand(tokens, args.experts, generator=g).argsort(1)[:, :args.topk].to(device)
                w = torch.rand(tokens, args.topk, generator=g).to(device)
                with torch.inference_mode():
                    if mode == "ll-graph":
                        times = _graph_times(moe, x, w, ids, args)
                    else:
                        times = _call_times(moe, x, w, ids, args, device)
                    row = {}
                    if mode == "moe":
                        normal_out[tokens] = moe(x, w, ids).float()
                    elif mode.startswith("ll") and tokens in normal_out:
                        diff = (moe(x, w, ids).float() - normal_out[tokens]).abs().max()
                        scale = normal_out[tokens].abs().max().clamp(min=1e-12)
                        err = torch.stack([diff / scale]).to(device)
                        dist.all_reduce(err, op=dist.ReduceOp.MAX)
                        row["max_rel_diff_vs_moe"] = err.item()
                # The slowest rank sets the pace of a collective: report the max median.
                med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
                dist.all_reduce(med, op=dist.ReduceOp.MAX)
                payload = tokens * args.topk * (2 * args.hidden * x.element_size() + 16)
                results.append({"mode": mode, "ranks": world, "tokens_per_rank": tokens,
                                "median_ms": med.item() * 1e3, "payload_mib": payload / 2**20,
                                "gb_per_s": payload / med.item() / 1e9,
                                "tokens_per_s_per_rank": tokens / med.item(), **row})
            if ep.low_latency is not None:
                ep.low_latency.close()
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def _call_times(moe, x, w, ids, args, device) -> list[float]:
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        moe(x, w, ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def _graph_times(moe, x, w, ids, args) -> list[float]:
    """Seconds per MoE call when --graph-layers calls replay as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        h = x
        for _ in range(2):
            moe(h, w, ids)                  # compile and warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(args.graph_layers):
                h = moe(h, w, ids)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) / args.graph_layers)
    return times


def run(world: int, args: argparse.Namespace) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, store.port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = out.get(timeout=1800)
    for p in procs:
        p.join()
    return results


def rebalance_run(args: argparse.Namespace, dispatch: str, batch: int) -> dict:
    import tempfile

    import transformers

    from engine import EngineConfig, SamplingParams
    from eplb.elastic import ElasticEPEngine, EplbConfig

    experts = args.engine_experts
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=args.engine_hidden, intermediate_size=2 * args.engine_hidden,
        moe_intermediate_size=args.engine_inter, num_hidden_layers=args.engine_layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=args.engine_hidden // 8, num_experts=experts, num_experts_per_tok=args.topk,
        norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"])
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        # Low latency: the buffers hold max_num_batched_tokens per rank; prompts beyond
        # that go through chunked prefill.
        tokens = args.ll_capacity if dispatch == "low_latency" else 2048
        engine_config = EngineConfig(model=folder, load_format="random", max_model_len=1024, device=args.device,
                                     max_num_seqs=max(batch, 1), max_num_batched_tokens=tokens)
        start = time.perf_counter()
        eng = ElasticEPEngine(engine_config, args.engine_ranks, eplb=EplbConfig(auto_rebalance=False),
                              worker_threads=args.threads, dispatch=dispatch)
        start_s = time.perf_counter() - start
        try:
            params = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
            for i in range(batch):
                eng.add_request([(7 * i + j) % 1000 for j in range(16)], params)

            def timed(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    start = time.perf_counter()
                    eng.step()
                    out.append((time.perf_counter() - start) * 1e3)
                return out

            timed(5)                                   # prefill and warm-up
            before = timed(args.iters)
            skew = torch.arange(1, experts + 1, dtype=torch.float64).pow(2).flip(0).repeat(eng.num_moe_layers, 1)
            eng.rebalance(skew, wait=False)
            during = []
            while eng.migrating:
                during += timed(1)
            after = timed(args.iters)
            return {"dispatch": dispatch, "start_s": start_s,
                    "ranks": args.engine_ranks, "layers": eng.num_moe_layers, "experts": experts,
                    "hidden": args.engine_hidden, "inter": args.engine_inter, "batch": batch,
                    "bytes_per_expert": eng.bytes_per_expert,
                    "step_ms_before": statistics.median(before), "step_ms_during": statistics.median(during),
                    "step_ms_during_max": max(during), "step_ms_after": statistics.median(after),
                    "steps_during": len(during), "bytes_moved": eng.stats.bytes_moved_total,
                    "rebalance_s": eng.stats.rebalance_seconds[-1]}
        finally:
            eng.shutdown()


def print_dispatch(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"EP dispatch/combine ({args.device}, {'nccl' if args.device == 'cuda' else 'gloo'}): "
          f"{args.experts} experts, hidden {args.hidden}, inter {args.inter}, top-{args.topk}, {args.dtype}, "
          f"{os.cpu_count()} cores, {args.threads} thread(s) per rank")
    print(f"{'mode':>9}{'ranks':>6}{'tokens':>8}{'median ms':>11}{'MiB':>8}{'GB/s':>8}{'tok/s/rank':>12}"
          f"{'rel diff':>10}")
    for r in rows:
        diff = f"{r['max_rel_diff_vs_moe']:>10.1e}" if "max_rel_diff_vs_moe" in r else ""
        print(f"{r['mode']:>9}{r['ranks']:>6}{r['tokens_per_rank']:>8}{r['median_ms']:>11.3f}"
              f"{r['payload_mib']:>8.2f}{r['gb_per_s']:>8.2f}{r['tokens_per_s_per_rank']:>12.0f}{diff}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--modes", nargs="+", default=["comm", "moe", "ll"],
                        choices=["comm", "moe", "ll", "ll-graph"])
    parser.add_argument("--ll-capacity", type=int, default=512,
                        help="low-latency buffer tokens per rank (engine: max_num_batched_tokens)")
    parser.add_argument("--graph-layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rebalance", action="store_true", help="also time decoding through a rebalance")
    parser.add_argument("--engine-ranks", type=int, default=2)
    parser.add_argument("--engine-experts", type=int, default=32)
    parser.add_argument("--engine-layers", type=int, default=4)
    parser.add_argument("--engine-hidden", type=int, default=512)
    parser.add_argument("--engine-inter", type=int, default=256)
    parser.add_argument("--engine-batch", type=int, nargs="+", default=[8])
    parser.add_argument("--engine-dispatch", nargs="+", default=["normal", "low_latency"],
                        choices=["normal", "low_latency"])
    parser.add_argument("--skip-dispatch", action="store_true", help="only the --rebalance run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for world in ([] if args.skip_dispatch else args.ranks):
        rows += run(world, args)
    if rows:
        print_dispatch(rows, args)
    runs = [rebalance_run(args, d, b) for d in args.engine_dispatch for b in args.engine_batch] \
        if args.rebalance else []
    for reb in runs:
        print(f"\nDecoding through a forced rebalance ({reb['dispatch']} dispatch): {reb['ranks']} ranks, "
              f"{reb['layers']} MoE layers x {reb['experts']} experts (hidden {reb['hidden']}, inter {reb['inter']}, "
              f"{reb['bytes_per_expert'] / 2**20:.2f} MiB per expert), batch {reb['batch']}, "
              f"engine start {reb['start_s']:.1f} s")
        print(f"step ms: before {reb['step_ms_before']:.2f}, during {reb['step_ms_during']:.2f} "
              f"(max {reb['step_ms_during_max']:.1f}, {reb['steps_during']} steps), after {reb['step_ms_after']:.2f}; "
              f"moved {reb['bytes_moved'] / 2**20:.1f} MiB in {reb['rebalance_s'] * 1e3:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()}, "results": rows,
                                         "rebalance": runs}, indent=2))


if __name__ == "__main__":
    main()
