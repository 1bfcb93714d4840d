"""Engine and kernel benchmark on one GPU: random bf16 weights at real model shapes.

    python benchmarks/engine_bench.py PHASE [--model NAME] [--batches 1,8,64,256] [--out FILE] [--smoke]

PHASE (run each in its own process, as the anchors ran vLLM and transformers):
  kernels  every Triton kernel against its torch reference at real shapes: error, median
           time (triton.testing.do_bench), and a few tile configs of attention and MoE
  engine   engine.LLM on one shape (benchmarks/shapes/NAME.json): decode step at each batch
           (1024 random prompt ids, 256 new, greedy, ignore EOS, whole batch in one call,
           step = (T(256) - T(1)) / 255, fresh prompts per call, faster of two calls, as in
           shared/anchors/h200-vllm-baseline.md), prefill throughput, and the decode-step
           floor = bytes one step must read / copy bandwidth measured in the same process
  profile  torch profiler over a few decode steps: host time by operator, device busy time
  idle     GPU idle time between decode steps (CUDA events around each step's device work),
           async scheduling on vs off, with the step time of each
  hf       transformers generate on the same shape (its own random weights), batch 1 and 8
--checkpoint DIR: the engine loads a saved seeded random checkpoint of the shape from DIR
(load_format=auto; written there first by benchmarks/random_checkpoint.py if absent)
instead of drawing random weights at load, as shared/anchors/h200-vllm-same-weights.md.
Each result is a JSON line appended to --out and printed. --smoke: tiny shapes on CPU
(Triton interpreter), to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = ROOT / "benchmarks" / "shapes"
from benchmarks.records import emit, record_to  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms: float = 60) -> float:
    import triton
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def copy_bandwidth(gib: float = 4.0) -> dict:
    """dst.copy_(src) on random bytes; (read + written) bytes over CUDA-event time."""
    n = int(gib * 2**30)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return dict(median_tbs=2 * n / times[len(times) // 2] / 1e12, best_tbs=2 * n / times[0] / 1e12)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float("nan") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


# -- kernels ----------------------------------------------------------------------------

def kernels_phase(smoke: bool) -> None:
    from engine.kernels.attention import AttnConfig, paged_attention_triton
    from engine.kernels.moe import MoEConfig, fused_moe_triton
    from engine.ops.attention import paged_attention, paged_attention_ref, write_kv, write_kv_ref
    from engine.ops.moe import fused_moe, fused_moe_ref
    from engine.ops.sampling import sample, sample_ref, topn_logprobs
    from engine.runner.inputs import prepare_inputs, prepare_inputs_ref
    from tests.engine.kernels.cases import attention_case
    from tests.engine.kernels.test_inputs_kernels import table_case
    from tests.engine.kernels.test_sampling_kernels import batch

    dev = "cpu" if smoke else "cuda"
    vocab = 3000 if smoke else 151936
    for B in ([4] if smoke else [1, 64, 256]):
        for mode in ("greedy", "plain", "top-k 50 + top-p 0.9"):
            logits, t, k, p, m, seeds, pos = batch(vocab, dev, rows=B)
            t.fill_(0.0 if mode == "greedy" else 0.8)
            k.fill_(50 if "top-k" in mode else -1)
            p.fill_(0.9 if "top-p" in mode else 1.0)
            m.zero_()
            args = (logits, t, k, p, m, seeds, pos)
            same = int((sample(*args, backend="triton") == sample_ref(*args)).sum())
            emit(kernel="sample", batch=B, vocab=vocab, mode=mode, exact=f"{same}/{B}",
                 triton_ms=bench_ms(lambda: sample(*args, backend="triton")), torch_ms=bench_ms(lambda: sample_ref(*args)))
    logits = torch.randn(4 if smoke else 64, vocab, device=dev) * 4
    sampled = logits.argmax(-1)
    a, b = topn_logprobs(logits, sampled, 20, backend="triton"), topn_logprobs(logits, sampled, 20, backend="torch")
    emit(kernel="topn_logprobs", batch=logits.shape[0], n=20, max_abs_err=(a[2] - b[2]).abs().max().item(),
         triton_ms=bench_ms(lambda: topn_logprobs(logits, sampled, 20, backend="triton")),
         torch_ms=bench_ms(lambda: topn_logprobs(logits, sampled, 20, backend="torch")))

    for name, computed, sched in (("decode", tuple(range(0, 5 * 256, 5)), (1,) * 256),
                                  ("prefill", (0,) * 8, (1024,) * 8)):
        table, rows, nsched, bs = table_case(dev, max_reqs=256, max_len=2048, block_size=16,
                                             computed=computed, scheduled=sched)
        nt = int(nsched.sum())
        r, o = prepare_inputs_ref(table, rows, nsched, nt, bs), prepare_inputs(table, rows, nsched, nt, bs, "triton")
        ok = all(torch.equal(getattr(r, f), getattr(o, f)) for f in ("input_ids", "slot_mapping", "block_table"))
        emit(kernel="prepare_inputs", case=name, exact=ok,
             triton_ms=bench_ms(lambda: prepare_inputs(table, rows, nsched, nt, bs, "triton")),
             torch_ms=bench_ms(lambda: prepare_inputs_ref(table, rows, nsched, nt, bs)))

    shapes = {"qwen3-30b-a3b": dict(hq=32, hkv=4, dk=128, dv=128, mla=False),
              "deepseek-v2-lite": dict(hq=16, hkv=1, dk=576, dv=512, mla=True)}
    for model, s in shapes.items():
        kv_tok = (1 if s["mla"] else 2) * s["hkv"] * s["dk"] * 2
        T = 64 if smoke else 8192
        q, k, v, meta = attention_case([(0, T)], s["hq"], s["hkv"], s["dk"], s["dv"], 16, s["mla"],
                                       torch.bfloat16, dev)
        vals = torch.randn(T, s["hkv"], s["dk"], device=dev).bfloat16()
        slots = torch.randperm(T, device=dev)
        kc = k.clone()
        write_kv(k, vals, slots, 16, "triton")
        write_kv_ref(kc, vals, slots, 16)
        emit(kernel="write_kv", model=model, tokens=T, exact=torch.equal(k, kc),
             triton_ms=bench_ms(lambda: write_kv(k, vals, slots, 16, "triton")),
             torch_ms=bench_ms(lambda: write_kv_ref(k, vals, slots, 16)))
        cases = [("decode", b, [(1152, 1)] * b) for b in ([2] if smoke else [1, 8, 64, 256])]
        cases += [("prefill", 8, [(0, 64 if smoke else 1024)] * 8), ("chunk", 1, [(3072, 64 if smoke else 1024)])]
        for kind, b, reqs in cases:
            q, k, v, meta = attention_case(reqs, s["hq"], s["hkv"], s["dk"], s["dv"], 16, s["mla"], torch.bfloat16, dev)
            scale = s["dk"] ** -0.5
            err = rel(paged_attention(q, k, v, meta, scale, "triton"),
                      paged_attention_ref(q.float(), k.float(), v.float(), meta, scale))
            kv_bytes = sum(meta.seq_lens_cpu) * kv_tok
            t_ms = bench_ms(lambda: paged_attention(q, k, v, meta, scale, "triton"))
            sweep = {}
            wide = s["mla"]
            if kind == "decode":
                configs = [(AttnConfig(16, 32, 4, 2), None), (AttnConfig(16, 32, 8, 2), None),
                           (AttnConfig(16, 16, 4, 2), None), (AttnConfig(16, 32, 4, 3), None),
                           (AttnConfig(16, 64, 8, 3), None)] if wide else [
                           (AttnConfig(16, 64, 4, 2), None), (AttnConfig(16, 64, 8, 2), None),
                           (AttnConfig(16, 32, 4, 3), None), (AttnConfig(16, 64, 4, 4), None),
                           (AttnConfig(16, 128, 8, 3), None)]
                configs += [(None, n) for n in (1, 2, 4, 8)]
            else:
                configs = [(AttnConfig(32, 32, 8, 2), None), (AttnConfig(32, 16, 8, 2), None),
                           (AttnConfig(16, 32, 8, 2), None), (AttnConfig(64, 16, 8, 2), None)] if wide else [
                           (AttnConfig(128, 64, 8, 2), None), (AttnConfig(128, 32, 8, 2), None),
                           (AttnConfig(64, 64, 4, 2), None), (AttnConfig(128, 64, 8, 3), None)]
            for c, n in configs:
                key = str(tuple(c)) if c else f"splits={n}"
                try:
                    sweep[key] = round(bench_ms(lambda: paged_attention_triton(q, k, v, meta, scale, c, n)), 4)
                except Exception as e:   # a config that fails to compile must not end the run
                    sweep[key] = f"error: {e}"[:120]
            emit(kernel="paged_attention", model=model, case=kind, batch=b, rel_err=err, triton_ms=t_ms,
                 kv_gbs=kv_bytes / t_ms / 1e6, torch_ms=bench_ms(lambda: paged_attention_ref(q, k, v, meta, scale)),
                 sweep=sweep)

    moe_shapes = {"qwen3-30b-a3b": (128, 2048, 768, 8), "deepseek-v2-lite": (64, 2048, 1408, 6)}
    for model, (E, H, I, K) in moe_shapes.items():
        if smoke:
            E, H, I, K = 8, 64, 32, 2
        w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).bfloat16()
        for T in ([3, 40] if smoke else [1, 8, 64, 256, 1024, 8192]):
            x = torch.randn(T, H, device=dev).bfloat16()
            w, ids = torch.randn(T, E, device=dev).softmax(-1).topk(K, dim=-1)
            w = w.bfloat16()
            err = rel(fused_moe(x, w13, w2, ids, w, "triton"), fused_moe_ref(x.float(), w13.float(), w2.float(), ids, w.float()))
            active = ids.unique().numel()
            bytes_ = active * 3 * H * I * 2 + 2 * T * H * 2
            t_ms = bench_ms(lambda: fused_moe(x, w13, w2, ids, w, "triton"))
            sweep = {}
            for c in [MoEConfig(16, 64, 128, 4, 4), MoEConfig(16, 32, 128, 4, 4), MoEConfig(16, 128, 64, 4, 4),
                      MoEConfig(32, 64, 128, 4, 4), MoEConfig(64, 128, 64, 8, 3), MoEConfig(128, 128, 64, 8, 3)]:
                if c.block_m > 16 and T < 64 or c.block_m >= 64 and T < 256:
                    continue
                try:
                    sweep[str(tuple(c))] = round(bench_ms(lambda: fused_moe_triton(x, w13, w2, ids, w, c)), 4)
                except Exception as e:
                    sweep[str(tuple(c))] = f"error: {e}"[:120]
            emit(kernel="fused_moe", model=model, tokens=T, rel_err=err, active_experts=active, triton_ms=t_ms,
                 weight_gbs=bytes_ / t_ms / 1e6, tflops=2 * T * K * 3 * H * I / t_ms / 1e9,
                 torch_ms=bench_ms(lambda: fused_moe_ref(x, w13, w2, ids, w)), sweep=sweep)


    from engine.ops.norm import rms_norm, rms_norm_ref
    from engine.ops.rotary import rotary, rotary_ref
    H = 64 if smoke else 2048
    for T in ([3] if smoke else [1, 256, 8192]):
        x, r = torch.randn(T, H, device=dev).bfloat16(), torch.randn(T, H, device=dev).bfloat16()
        w = torch.randn(H, device=dev).bfloat16()
        out, res = rms_norm(x, w, 1e-6, r, backend="triton")
        ref, ref_res = rms_norm_ref(x.double(), w.double(), 1e-6, r.double())
        emit(kernel="rms_norm+residual", tokens=T, hidden=H, rel_err=rel(out, ref), residual_exact=torch.equal(res, x + r),
             triton_ms=bench_ms(lambda: rms_norm(x, w, 1e-6, r, backend="triton")),
             torch_ms=bench_ms(lambda: rms_norm_ref(x, w, 1e-6, r)))
        for name, hq, hk, d, inter, norm in (("qwen3 qk-norm+rope", 32, 4, 128, False, True),
                                             ("deepseek rope", 16, 1, 64, True, False)):
            q, k = torch.randn(T, hq, d, device=dev).bfloat16(), torch.randn(T, hk, d, device=dev).bfloat16()
            pos = torch.randint(0, 2048, (T,), device=dev)
            freqs = torch.arange(2048, device=dev).float()[:, None] * (1e-4 ** (torch.arange(0, d, 2, device=dev) / d))
            cos, sin = freqs.cos(), freqs.sin()
            nw = (torch.randn(d, device=dev).bfloat16(), torch.randn(d, device=dev).bfloat16()) if norm else (None, None)
            qo, _ = rotary(pos, q, k, cos, sin, inter, *nw, backend="triton")
            qr, _ = rotary_ref(pos, q.double(), k.double(), cos.double(), sin.double(), inter,
                               *(x.double() if x is not None else None for x in nw))
            emit(kernel="rotary", case=name, tokens=T, rel_err=rel(qo, qr),
                 triton_ms=bench_ms(lambda: rotary(pos, q, k, cos, sin, inter, *nw, backend="triton")),
                 torch_ms=bench_ms(lambda: rotary_ref(pos, q, k, cos, sin, inter, *nw)))


# -- engine -----------------------------------------------------------------------------

def config_dir(model: str, smoke: bool) -> Path:
    cfg = json.loads((SHAPES / f"{model}.json").read_text())
    if smoke:   # same families, toy sizes
        cfg.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512, intermediate_size=128,
                   moe_intermediate_size=32, max_position_embeddings=2048)
        if "qwen" in model:
            cfg.update(num_key_value_heads=2, head_dim=16, num_experts=8)
        elif "nemotron" in model:   # the same layer pattern cut to 6 layers, toy widths
            cfg.update(num_key_value_heads=2, head_dim=16, num_hidden_layers=6, hybrid_override_pattern="MEM*EM",
                       mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2, n_routed_experts=8,
                       num_experts_per_tok=2, moe_shared_expert_intermediate_size=64, chunk_size=16,
                       **(dict(moe_latent_size=32) if "moe_latent_size" in cfg else {}))
        else:
            cfg.update(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                       v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)
    folder = Path(tempfile.mkdtemp(prefix=f"{model}-"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def decode_floor(llm, batch: int, ctx: float, bandwidth: float, distinct: float | None) -> dict:
    """Bytes one decode step must read: non-expert weights (LM head included, the embedding
    only as rows), the experts the step's tokens touch in each MoE layer, the KV of the
    attention layers, and for hybrid models each sequence's Mamba state slot (conv window
    and SSM state of every Mamba layer), read and written back once per step."""
    model = llm.engine.model
    moe = model.moe_layers()
    expert_params = sum(m.w13.numel() + m.w2.numel() for m in moe)
    per_expert = (moe[0].w13[0].numel() + moe[0].w2[0].numel()) * 2 if moe else 0
    other = sum(p.numel() for p in model.parameters()) - expert_params - model.embed_tokens.numel()
    E = moe[0].num_physical if moe else 1
    k = model.config.num_experts_per_tok
    uniform = E * (1 - (1 - k / E) ** batch)
    used = distinct if distinct is not None else uniform
    layout = model.cache_layout()
    kv = batch * ctx * layout.bytes_per_block(1, torch.bfloat16)
    weights = other * 2 + len(moe) * used * per_expert
    state_layout = getattr(model, "state_layout", lambda: None)()
    state = 2 * batch * state_layout.bytes_per_slot(torch.bfloat16) if state_layout is not None else 0
    return dict(floor_ms=(weights + kv + state) / bandwidth * 1e3, weight_gb=weights / 1e9, kv_gb=kv / 1e9,
                state_rw_gb=state / 1e9, experts_per_layer=used, experts_if_uniform=uniform)


def measured_distinct_experts(llm, prompts: list[list[int]]) -> float:
    """Experts that saw a token in one decode step of the whole batch, mean over MoE layers."""
    from engine import SamplingParams
    from engine.request import Request
    core = llm.engine
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    ids = [f"probe-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        core.add_request(Request(rid, p, sp, frozenset()))
    started: set[str] = set()
    while len(started) < len(ids):        # until every prefill is done
        started.update(o.request_id for o in core.step() if o.new_token_ids)
    layers = core.model.moe_layers()
    for m in layers:
        m.expert_load.zero_()
    core.step()                            # one decode token for every request
    core.abort_requests(ids)
    return sum((m.expert_load > 0).sum().item() for m in layers) / len(layers)


ENGINE_FLAGS: dict = {}     # --eager / --sync: graphs and async scheduling off
CHECKPOINT: Path | None = None    # --checkpoint: a saved random checkpoint instead of load-time weights


def make_llm(model: str, batches: list[int], smoke: bool):
    from engine import LLM
    if CHECKPOINT is not None:
        from benchmarks.random_checkpoint import write
        tiny = dict(config=config_dir(model, smoke) / "config.json", device="cpu") if smoke else {}
        emit(phase="checkpoint", **write(model, CHECKPOINT, **tiny))
        source, load_format = CHECKPOINT, "auto"
    else:
        source, load_format = config_dir(model, smoke), "random"
    t0 = time.perf_counter()
    llm = LLM(str(source), device="cpu" if smoke else "cuda", dtype="bfloat16",
              load_format=load_format, seed=0, max_num_seqs=max(batches), max_num_batched_tokens=16384,
              max_model_len=2048, **ENGINE_FLAGS)
    c = llm.engine.config
    graphs = llm.engine.runner.graphs
    emit(phase="engine-start", model=model, load_format=load_format, seconds=time.perf_counter() - t0,
         kv_blocks=llm.engine.num_blocks,
         cuda_graphs=c.enable_cuda_graphs, async_scheduling=c.async_scheduling,
         graph_sizes=sorted(graphs.graphs) if graphs is not None else None)
    return llm


def engine_phase(model: str, batches: list[int], smoke: bool, budget_s: float) -> None:
    from engine import SamplingParams
    bw = copy_bandwidth(0.25 if smoke else 4.0) if torch.cuda.is_available() else dict(median_tbs=0.1, best_tbs=0.1)
    emit(phase="copy", **bw)
    prompt_len, new = (32, 8) if smoke else (1024, 256)
    llm = make_llm(model, batches, smoke)
    start = time.perf_counter()     # the budget is for timing: writing a checkpoint is not counted
    vocab = llm.engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompts(b: int) -> list[list[int]]:
        return torch.randint(0, vocab, (b, prompt_len), generator=gen).tolist()

    def call(b: int, n: int) -> float:
        p = prompts(b)
        sync()
        t = time.perf_counter()
        outs = llm.generate(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        sync()
        assert all(len(o.token_ids) == n for o in outs)
        return time.perf_counter() - t

    call(4, 32 if not smoke else 4)                       # warm-up, as the anchors
    for b in batches:
        warm_new = 32 if not smoke else 4
        warm = call(b, warm_new)
        left = budget_s - (time.perf_counter() - start)
        est = 1.2 * warm * (new / warm_new + 0.3)           # one T(new) and one T(1)
        if est > left:
            emit(phase="engine", model=model, batch=b, skipped=f"estimated {est:.0f}s > {left:.0f}s left")
            continue
        reps = 2 if 2 * est <= left else 1
        t_new = [call(b, new) for _ in range(reps)]
        t_one = [call(b, 1) for _ in range(reps)]
        step = (min(t_new) - min(t_one)) / (new - 1)
        try:
            distinct = measured_distinct_experts(llm, prompts(b)) if llm.engine.model.moe_layers() else None
        except Exception as e:   # the floor then assumes uniform routing
            emit(phase="probe-error", error=repr(e)[:200])
            distinct = None
        floor = decode_floor(llm, b, prompt_len + new / 2, bw["median_tbs"] * 1e12, distinct)
        emit(phase="engine", model=model, batch=b, step_ms=step * 1e3, decode_tok_s=b / step,
             output_tok_s=b * new / min(t_new), prefill_tok_s=b * prompt_len / min(t_one),
             t_new_s=t_new, t_one_s=t_one, floor_ratio=floor["floor_ms"] / (step * 1e3), **floor)


def idle_phase(model: str, batches: list[int], smoke: bool) -> None:
    """GPU idle time between decode steps: each step records a CUDA event before its
    first device work and one after the copy of its tokens; the idle time between
    steps i and i+1 is the time from the first's end to the second's start on the
    device (zero when the host had queued step i+1 before step i finished)."""
    from engine import SamplingParams
    llm = make_llm(model, batches, smoke)
    core, runner = llm.engine, llm.engine.runner
    vocab = core.model.config.vocab_size
    plen, new, keep = (16, 12, 6) if smoke else (1024, 96, 64)
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for b in batches:
        for async_on in (True, False):
            core.config.async_scheduling = async_on
            runner.step_events = []
            prompts = torch.randint(0, vocab, (b, plen)).tolist()
            sync()
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
            sync()
            wall = time.perf_counter() - t
            events = runner.step_events[-keep - 2:-2]   # steady decode steps
            runner.step_events = None
            if not torch.cuda.is_available():
                emit(phase="idle", model=model, batch=b, async_scheduling=async_on, steps=len(events), wall_s=wall)
                continue
            gaps = [max(0.0, e1.elapsed_time(s2)) for (_, e1), (s2, _) in zip(events, events[1:])]
            span = events[0][0].elapsed_time(events[-1][1])
            busy = [s.elapsed_time(e) for s, e in events]
            emit(phase="idle", model=model, batch=b, async_scheduling=async_on, steps=len(events),
                 step_ms=span / len(events), idle_ms_per_step=sum(gaps) / len(gaps),
                 idle_fraction=sum(gaps) / span, step_device_span_ms=sorted(busy)[len(busy) // 2], wall_s=wall)
    core.config.async_scheduling = True


def profile_phase(model: str, batches: list[int], smoke: bool) -> None:
    """Where a decode step's time goes: torch profiler over 8 decode steps per batch,
    host (CPU) time by operator and device time in total."""
    from torch.profiler import ProfilerActivity, profile
    from engine import SamplingParams
    from engine.request import Request
    llm = make_llm(model, batches, smoke)
    core, vocab = llm.engine, llm.engine.model.config.vocab_size
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for b in batches:
        sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        ids = [f"prof-{b}-{i}" for i in range(b)]
        for rid in ids:
            core.add_request(Request(rid, torch.randint(0, vocab, (64,)).tolist(), sp, frozenset()))
        for _ in range(4):                 # prefill and a few decode steps
            core.step()
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        steps = 8
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                core.step()
            sync()
            wall = (time.perf_counter() - t) / steps
        core.abort_requests(ids)
        ev = prof.key_averages()
        dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ev) / steps
        top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
        ops_ms = sum(e.self_cpu_time_total for e in ev) / steps / 1e3
        kernels = sorted((e for e in ev if (getattr(e, "self_device_time_total", 0) or 0) > 0),
                         key=lambda e: e.self_device_time_total, reverse=True)[:25]
        emit(phase="profile-kernels", model=model, batch=b,
             device_ms_per_step={e.key[:70]: [round(e.self_device_time_total / steps / 1e3, 4),
                                              round(e.count / steps, 1)] for e in kernels})
        emit(phase="profile", model=model, batch=b, step_ms=wall * 1e3, device_busy_ms=dev_us / 1e3,
             torch_ops_cpu_ms=ops_ms,
             launches_per_step=sum(e.count for e in ev if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
             / steps, top_cpu_ms_per_step={e.key[:60]: round(e.self_cpu_time_total / steps / 1e3, 3) for e in top})


def host_overhead_phase(smoke: bool) -> None:
    """Host time per call of each dispatcher at decode size (batch 1, Qwen3 shapes), no
    sync in between: what each kernel costs the CPU-bound eager step."""
    from engine.ops.attention import paged_attention, write_kv
    from engine.ops.moe import fused_moe
    from engine.ops.sampling import sample
    from tests.engine.kernels.cases import attention_case
    from tests.engine.kernels.test_sampling_kernels import batch
    dev = "cpu" if smoke else "cuda"
    q, k, v, meta = attention_case([(1100, 1)], 32, 4, 128, 128, 16, False, torch.bfloat16, dev)
    E, H, I = (8, 64, 32) if smoke else (128, 2048, 768)
    x = torch.randn(1, H, device=dev).bfloat16()
    w13, w2 = torch.randn(E, 2 * I, H, device=dev).bfloat16(), torch.randn(E, H, I, device=dev).bfloat16()
    w, ids = torch.randn(1, E, device=dev).softmax(-1).topk(8 if not smoke else 2, dim=-1)
    vals, slots = torch.randn(1, 4, 128, device=dev).bfloat16(), torch.zeros(1, dtype=torch.int64, device=dev)
    sargs = batch(3000 if smoke else 151936, dev, rows=1)
    calls = {"paged_attention": lambda: paged_attention(q, k, v, meta, 0.1, "triton"),
             "write_kv": lambda: write_kv(k, vals, slots, 16, "triton"),
             "fused_moe": lambda: fused_moe(x, w13, w2, ids, w.bfloat16(), "triton"),
             "sample": lambda: sample(*sargs, backend="triton"),
             "torch_add (reference point)": lambda: x.add(x)}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        sync()
        n = 3 if smoke else 200
        t = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) / n
        sync()
        emit(phase="host-overhead", op=name, host_us_per_call=host * 1e6)


# -- transformers -----------------------------------------------------------------------

def hf_phase(model: str, batches: list[int], smoke: bool, new: int, budget_s: float = 1e9) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    dev = "cpu" if smoke else "cuda"
    cfg = AutoConfig.from_pretrained(str(config_dir(model, smoke)))
    t0 = time.perf_counter()
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    emit(phase="hf-start", model=model, seconds=time.perf_counter() - t0,
         attn=getattr(hf.config, "_attn_implementation", None))
    plen = 32 if smoke else 1024

    def call(b: int, n: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (b, plen), device=dev)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t

    call(1, 4)
    for b in batches:
        warm = call(b, 4)
        left = budget_s - (time.perf_counter() - t0)
        est = 1.2 * warm * (new / 4 + 0.3)
        if est > left:
            emit(phase="hf", model=model, batch=b, skipped=f"estimated {est:.0f}s > {left:.0f}s left", warm_s=warm)
            continue
        t_new, t_one = call(b, new), call(b, 1)
        step = (t_new - t_one) / (new - 1)
        emit(phase="hf", model=model, batch=b, new_tokens=new, step_ms=step * 1e3, decode_tok_s=b / step,
             prefill_tok_s=b * plen / t_one, t_new_s=t_new, t_one_s=t_one)


def main() -> None:
    global CHECKPOINT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["kernels", "engine", "profile", "idle", "hf", "copy"])
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=[p.stem for p in SHAPES.glob("*.json")])
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--new-tokens", type=int, default=64, help="hf phase: tokens per timed generate")
    ap.add_argument("--budget-s", type=float, default=400, help="engine and hf phases: skip batches that would overrun (counted from a ready engine)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--eager", action="store_true", help="CUDA graphs off")
    ap.add_argument("--sync", action="store_true", help="async scheduling off")
    ap.add_argument("--checkpoint", type=Path, help="load a saved random checkpoint from here (written if absent)")
    args = ap.parse_args()
    if args.eager:
        ENGINE_FLAGS["enable_cuda_graphs"] = False
    if args.sync:
        ENGINE_FLAGS["async_scheduling"] = False
    record_to(args.out)
    CHECKPOINT = args.checkpoint
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    batches = [int(b) for b in args.batches.split(",")]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        emit(phase="env", device=p.name, sms=p.multi_processor_count, torch=torch.__version__,
             triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    torch.manual_seed(0)
    if args.phase == "kernels":
        kernels_phase(args.smoke)
    elif args.phase == "engine":
        engine_phase(args.model, batches, args.smoke, args.budget_s)
    elif args.phase == "profile":
        host_overhead_phase(args.smoke)
        profile_phase(args.model, batches, args.smoke)
    elif args.phase == "idle":
        idle_phase(args.model, batches, args.smoke)
    elif args.phase == "hf":
        hf_phase(args.model, batches, args.smoke, args.new_tokens, args.budget_s)
    else:
        emit(phase="copy", **copy_bandwidth())


if __name__ == "__main__":
    main()
