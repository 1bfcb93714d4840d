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
   it at K = 1, 3, 5, 7 and batch 1, 8, 64 (every output checked equal to the plain
   one; each batch warmed up on its own prompts before two timed runs), acceptance
   length, the same head as a chain drafter (K sequential passes), and the GPU idle
   time between steps with speculation on.
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

from benchmarks.engine_bench import copy_bandwidth  # noqa: E402

MASK_ID, VOCAB = 256, 320
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


def idle_fraction(events) -> dict:
    """GPU idle between steps from the runner's per-step CUDA events (benchmarks/engine_bench.py idle)."""
    events = events[2:-2]     # steady decode steps
    if len(events) < 3:
        return {}
    gaps = [max(0.0, e1.elapsed_time(s2)) for (_, e1), (s2, _) in zip(events, events[1:])]
    span = events[0][0].elapsed_time(events[-1][1])
    return dict(idle_fraction=round(sum(gaps) / span, 4), step_ms=round(span / len(events), 3), steps=len(events))


def measure(target_dir: Path, head_dir: Path, held_out: torch.Tensor, smoke: bool, budget_s: float) -> None:
    """Runs in order of interest until budget_s is spent (what ran is emitted)."""
    from engine import LLM, SamplingParams
    dev = "cpu" if smoke else "cuda"
    batches, ks, new = ([1, 4], [1, 3], 16) if smoke else ([1, 8, 64], [1, 3, 5, 7], 128)
    gen = torch.Generator().manual_seed(2)
    prompts = {b: windows(held_out, b, 64, gen).tolist() for b in batches}
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    base: dict[int, tuple[list, float]] = {}
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
        for b in batches:
            runner, core = llm.engine.runner, llm.engine
            # Warm-up with this batch's own prompts: every shape it meets (prefill, and the
            # prefix-cache hit the timed runs get) is compiled or planned before timing.
            llm.generate(prompts[b], sp)
            core.spec_stats.__init__()
            best, outs = float("inf"), None
            for rep in range(2):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                runner.step_events = [] if (rep == 1 and dev == "cuda") else None
                t0 = time.perf_counter()
                outs = [o.outputs[0].token_ids for o in llm.generate(prompts[b], sp)]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            idle = idle_fraction(runner.step_events or [])
            runner.step_events = None
            rec = dict(phase="decode", k=k or 0, parallel_drafting=parallel, batch=b, seconds=round(best, 4),
                       tokens_per_s=round(b * new / best, 1), **idle)
            if k is None:
                base[b] = (outs, best)
            else:
                st = core.spec_stats
                # bf16: a (K+1)-token verification and a 1-token decode round differently,
                # so a near-tie may flip; the CPU/float32 tests check exact equality.
                same = sum(a == p for a, p in zip(outs, base[b][0]))
                rec.update(identical_outputs=f"{same}/{b}", speedup=round(base[b][1] / best, 3),
                           acceptance_length=round(st.mean_acceptance_length, 3),
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
