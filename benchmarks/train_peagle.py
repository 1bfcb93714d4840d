"""Train a small target and its P-EAGLE head on one GPU, then measure speculative decoding.

    python benchmarks/train_peagle.py [--dir /tmp/peagle] [--target-s 120] [--head-s 90] [--measure-s 600]
                                      [--sequences 4096] [--head-layers 2] [--head-batch 64] [--head-lr 2e-3]
                                      [--out FILE] [--smoke]

Nothing can be downloaded, so the pair is trained here, on text every machine has: the
Python standard library's source, byte-level (token = byte, vocabulary 320, the mask
token 256 never occurs in the text).
1. target: a Qwen3-MoE (8 layers, hidden 512, 16 experts top-2; ~57M parameters) trained
   for --target-s seconds (AdamW, bf16 autocast), saved in Hugging Face layout;
2. data: the target's own greedy continuations (64 + 128 bytes) of --sequences windows
   of the library, generated in one wide batch (P-EAGLE trains on what the target
   generates), and its taps and logits over them, kept on the GPU;
3. head: --head-layers layers, trained for --head-s seconds (bf16 autocast, --head-batch
   sequences a step, cosine schedule on elapsed time) with engine/spec/train.py's
   parallel-drafting objective for K up to 7, saved in the speculators `peagle` layout;
   its offline acceptance is measured on the target's continuations of held-out files;
4. engine.LLM (CUDA graphs, async scheduling), greedy, 128 new tokens from held-out
   windows (files the target never saw): decode tokens/s without speculation and with
   it at K = 1, 3, 5, 7 and batch 1 (8 requests in turn), 8, 64 (every output checked
   equal to the plain one; each batch warmed up on its own prompts before two timed
   runs), acceptance length, speed-up end to end and in steady decoding, the same head
   as a chain drafter (K sequential passes), and the GPU idle time between steps.
Each result is a JSON line printed and appended to --out. --smoke: tiny sizes on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import copy_bandwidth, sync  # noqa: E402

MASK_ID, VOCAB = 256, 320
SINGLE_REQUESTS = 8    # batch 1: this many requests, one at a time
from benchmarks.records import emit, record_to  # noqa: E402


def corpus(smoke: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes): the standard library's .py files (tests excluded),
    sorted; the last 5% of files are held out."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if not {"test", "tests", "idlelib"} & set(p.parts))
    if smoke:
        files = files[:40]
    cut = int(len(files) * 0.95)

    def read(fs):
        data = b"\n".join(p.read_bytes() for p in fs)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return read(files[:cut]), read(files[cut:])


def windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length, (n,), generator=gen)
    return data[starts[:, None] + torch.arange(length)]


def target_config(smoke: bool):
    from transformers import Qwen3MoeConfig
    size = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                moe_intermediate_size=32, num_experts=4) if smoke else dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        moe_intermediate_size=256, num_experts=16)
    return Qwen3MoeConfig(vocab_size=VOCAB, intermediate_size=4 * size["hidden_size"], num_experts_per_tok=2,
                          norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=1024,
                          rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                          pad_token_id=None, **size)


def train_target(train: torch.Tensor, seconds: float, dev: str, smoke: bool):
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(target_config(smoke)).to(dev)
    params = sum(p.numel() for p in model.parameters())
    batch, seq = (8, 64) if smoke else (64, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    t0, step, losses = time.perf_counter(), 0, []
    model.train()
    while time.perf_counter() - t0 < seconds:
        frac = (time.perf_counter() - t0) / seconds
        for g in opt.param_groups:   # warm-up, then cosine on elapsed time
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = windows(train, batch, seq + 1, gen).to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            losses.append(float(loss.detach()))
    model.eval()
    emit(phase="target", params=params, steps=step, tokens=step * batch * seq, seconds=round(seconds, 1),
         loss_every_100=[round(x, 3) for x in losses], final_loss=float(loss.detach()))
    return model


@torch.no_grad()
def greedy_data(model, prompts: torch.Tensor, dev: str, smoke: bool) -> torch.Tensor:
    """The target's greedy continuations of the prompts (+128 bytes, +24 with --smoke),
    generated in wide batches; the mask token is never generated."""
    outs = []
    for chunk in prompts.to(dev).split(8192):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            outs.append(model.generate(chunk, max_new_tokens=24 if smoke else 128, do_sample=False,
                                       suppress_tokens=[MASK_ID], attention_mask=torch.ones_like(chunk),
                                       pad_token_id=0))
    return torch.cat(outs)


@torch.no_grad()
def features(model, tokens: torch.Tensor, layer_ids: list[int], dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's taps and logits over all sequences, kept on the device (bf16 on a GPU)."""
    from engine.spec.train import target_features
    keep = torch.bfloat16 if dev == "cuda" else torch.float32
    aux, logits = [], []
    for chunk in tokens.split(256):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            a, lg = target_features(model, chunk, layer_ids)
        aux.append(a.to(keep))
        logits.append(lg.to(keep))
    return torch.cat(aux), torch.cat(logits)


def train_peagle_head(model, tokens: torch.Tensor, held: torch.Tensor, seconds: float, smoke: bool,
                      layers: int = 2, batch: int = 64, lr: float = 2e-3, depths: int = 7):
    """Trains for `seconds` on `tokens`; the offline acceptance is measured on `held`
    (greedy continuations of held-out files, as the engine measurement's prompts)."""
    from engine.spec.train import (
        TrainConfig,
        acceptance_length,
        chain_counts,
        init_from_target,
        new_head,
        train_head,
    )
    dev = tokens.device.type
    head = new_head(model.config, None, MASK_ID, depths, num_layers=layers).to(tokens.device)
    init_from_target(head, model)
    t0 = time.perf_counter()
    aux, logits = features(model, tokens, head.cfg.aux_layer_ids, dev)
    feature_s = time.perf_counter() - t0
    cfg = TrainConfig(depths=depths, seconds=seconds, batch_size=4 if smoke else batch, lr=lr,
                      warmup_steps=5 if smoke else 50)
    log = train_head(head, tokens, aux, logits, cfg)
    del aux, logits
    h_aux, h_logits = features(model, held, head.cfg.aux_layer_ids, dev)
    plen = 16 if smoke else 64
    al, per_pos = acceptance_length(head, held, h_aux, h_logits, depths, plen - 2)
    emit(phase="head", steps=log.steps, step_s=round(log.step_s, 4), final_loss=log.losses[-1],
         offline_acceptance_length_k7=round(al, 3), offline_accept_per_position=[round(float(x), 3) for x in per_pos],
         seconds=round(log.seconds, 1), feature_s=round(feature_s, 1), sequences=tokens.shape[0],
         held_out_sequences=held.shape[0], layers=layers, batch=cfg.batch_size, lr=lr,
         rows_per_step=cfg.batch_size * sum(chain_counts(tokens.shape[1], depths, cfg.cod_ratio, cfg.cod_min_ratio)),
         loss_every_sync=[round(x, 3) for x in log.losses[::max(1, len(log.losses) // 10)]],
         top1_per_depth=[round(x, 3) for x in log.top1])
    return head


def step_times(events) -> tuple[list[float], list[float]]:
    """(device span of each steady decode step, gap before each but the first) in ms,
    from the runner's per-step CUDA events of one generate call (the first two steps,
    prefill among them, and the last two are left out)."""
    events = events[2:-2]
    spans = [s.elapsed_time(e) for s, e in events]
    gaps = [max(0.0, e1.elapsed_time(s2)) for (_, e1), (s2, _) in zip(events, events[1:])]
    return spans, gaps


def timed_generate(llm, groups: list[list[list[int]]], sp, events: bool) -> tuple[float, list, list, list]:
    """Run each group of prompts as one generate call, in turn -> (seconds in all, the
    outputs, steady step spans, gaps between steps), spans and gaps with `events`."""
    runner, seconds, outs, spans, gaps = llm.engine.runner, 0.0, [], [], []
    for group in groups:
        runner.step_events = [] if events else None
        sync()
        t0 = time.perf_counter()
        outs += [o.outputs[0].token_ids for o in llm.generate(group, sp)]
        sync()
        seconds += time.perf_counter() - t0
        if events:
            sp_, gp = step_times(runner.step_events)
            spans, gaps = spans + sp_, gaps + gp
    runner.step_events = None
    return seconds, outs, spans, gaps


def measure(target_dir: Path, head_dir: Path, held_out: torch.Tensor, smoke: bool, budget_s: float) -> None:
    """Runs in order of interest until budget_s is spent (what ran is emitted).

    Batch 1 is SINGLE_REQUESTS requests one at a time (one request's 128 tokens say
    little about acceptance). Per run: tokens/s end to end (prefill included) and its
    speed-up over the plain run; the median device span of a steady decode step and the
    GPU idle between steps (runner events, launch to end); the steady decode speed-up
    = acceptance length x plain step / speculative step."""
    from engine import LLM, SamplingParams
    dev = "cpu" if smoke else "cuda"
    batches, ks, new = ([1, 4], [1, 3], 16) if smoke else ([1, 8, 64], [1, 3, 5, 7], 128)
    gen = torch.Generator().manual_seed(2)
    groups = {b: ([[p] for p in windows(held_out, SINGLE_REQUESTS, 64, gen).tolist()] if b == 1
                  else [windows(held_out, b, 64, gen).tolist()]) for b in batches}
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    base: dict[int, tuple[list, float, float]] = {}
    # The most telling first (a run cut short by its time limit keeps them).
    runs = [(None, True)] + [(k, True) for k in reversed(ks)] + [(k, False) for k in reversed(ks[-2:])]
    t_start = time.perf_counter()
    for k, parallel in runs:
        if time.perf_counter() - t_start > budget_s:
            emit(phase="skipped", k=k, parallel_drafting=parallel, reason=f"measure budget {budget_s} s spent")
            continue
        spec = None if k is None else {"method": "peagle", "model": str(head_dir), "num_speculative_tokens": k,
                                       "parallel_drafting": parallel}
        args = dict(device=dev, max_num_seqs=max(batches), max_model_len=512, block_size=16,
                    num_kv_blocks=max(batches) * 32 + 64, speculative_config=spec)
        try:
            llm = LLM(str(target_dir), **args)
        except Exception as e:      # noqa: BLE001 (report it and measure the rest)
            emit(phase="error", k=k, parallel_drafting=parallel, error=repr(e)[:400])
            continue
        core = llm.engine
        for b in batches:
            # Warm-up with this batch's own prompts: every shape it meets (prefill, and the
            # prefix-cache hit the timed runs get) is compiled or planned before timing.
            for group in groups[b]:
                llm.generate(group, sp)
            core.spec_stats.__init__()
            reps = [timed_generate(llm, groups[b], sp, events=rep == 1 and dev == "cuda") for rep in range(2)]
            seconds = min(r[0] for r in reps)
            _, outs, spans, gaps = reps[1]
            n_req = sum(len(g) for g in groups[b])
            step_ms = sorted(spans)[len(spans) // 2] if spans else None
            rec = dict(phase="decode", k=k or 0, parallel_drafting=parallel, batch=b, requests=n_req,
                       seconds=round(seconds, 4), tokens_per_s=round(n_req * new / seconds, 1),
                       step_ms=step_ms and round(step_ms, 3), steps=len(spans),
                       idle_fraction=round(sum(gaps) / (sum(spans) + sum(gaps)), 4) if spans else None)
            if k is None:
                base[b] = (outs, seconds, step_ms)
            else:
                st = core.spec_stats
                al = st.mean_acceptance_length
                # bf16: a (K+1)-token verification and a 1-token decode round differently,
                # so a near-tie may flip; the CPU/float32 tests check exact equality.
                same = sum(a == p for a, p in zip(outs, base[b][0]))
                rec.update(identical_outputs=f"{same}/{n_req}", speedup=round(base[b][1] / seconds, 3),
                           steady_speedup=round(al * base[b][2] / step_ms, 3) if step_ms and base[b][2] else None,
                           acceptance_length=round(al, 3),
                           accepted_per_position=[round(x / max(st.num_drafts, 1), 3)
                                                  for x in st.accepted_per_position])
            emit(**rec)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/peagle")
    ap.add_argument("--target-s", type=float, default=120.0)
    ap.add_argument("--head-s", type=float, default=90.0)
    ap.add_argument("--measure-s", type=float, default=600.0, help="stop starting new engine runs after this")
    ap.add_argument("--sequences", type=int, default=4096, help="greedy sequences the head trains on")
    ap.add_argument("--head-layers", type=int, default=2)
    ap.add_argument("--head-batch", type=int, default=64, help="sequences per head training step")
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    record_to(a.out)
    dev = "cpu" if a.smoke else "cuda"
    root = Path(a.dir)
    target_dir, head_dir = root / "target", root / "head"
    if not a.smoke:
        emit(phase="copy", **copy_bandwidth())
    train, held_out = corpus(a.smoke)
    emit(phase="corpus", train_bytes=train.numel(), held_out_bytes=held_out.numel())
    model = train_target(train, a.target_s, dev, a.smoke)
    model.generation_config.eos_token_id = None
    model.save_pretrained(str(target_dir))
    t0 = time.perf_counter()
    # Training sequences from the library, held-out ones (for the offline acceptance) from
    # the files the engine measurement prompts with; one generate call for both.
    plen, n = (16, 16) if a.smoke else (64, a.sequences)
    prompts = torch.cat([windows(train, n, plen, torch.Generator().manual_seed(1)),
                         windows(held_out, 4 if a.smoke else 64, plen, torch.Generator().manual_seed(3))])
    seq = greedy_data(model, prompts, dev, a.smoke)
    tokens, held = (x[~(x == MASK_ID).any(1)] for x in (seq[:n], seq[n:]))   # none should have it
    emit(phase="data", sequences=tokens.shape[0], length=tokens.shape[1], seconds=round(time.perf_counter() - t0, 1))
    head = train_peagle_head(model, tokens, held, a.head_s, a.smoke, a.head_layers, a.head_batch, a.head_lr)
    from engine.spec.checkpoint import save_head
    save_head(head.cpu(), head_dir, "speculators", verifier=str(target_dir))
    del model, head, tokens, held
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    measure(target_dir, head_dir, held_out, a.smoke, a.measure_s)


if __name__ == "__main__":
    main()
