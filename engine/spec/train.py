"""Train a P-EAGLE head against a target's hidden states (torch, CPU or GPU).

It lives in the engine package, next to the head it trains, because its pieces are
library code with tests (the chain alignment, the mask, the loss, the acceptance
measure); the serving path never imports it. A device script that also trains a
target first (issue 16's benchmarks/train_peagle.py) can call train_head().

Parallel-drafting objective (reference/peagle.md §1.3). For a sequence x_0..x_{N-1}
with target taps g_j and target logits l_j:
- a depth-0 row anchored at j sits at position j, reads (x_{j+1}, fc(g_j)) and learns
  l_{j+1} (the target's distribution for x_{j+2});
- a depth-d row anchored at j sits at position j+d, reads (mask token, fc(mask_hidden))
  and learns l_{j+d+1}.
A row sees depth-0 rows anchored at or before its anchor and its own chain's rows up
to its depth: exactly what a causal pass over [context | NTP | K-1 MTP] sees at
inference. Deeper rows are subsampled (COD: depth d keeps max(r^d, r_min) of the
anchors, nested in depth d-1's). Loss: cross-entropy to the target's distribution
(KL up to a constant), averaged per depth, then over depths.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.kernels import kernel_backend
from engine.models.loader import init_random
from engine.spec.checkpoint import save_head
from engine.spec.config import PEagleConfig, default_aux_layers
from engine.spec.head import PEagleHead
from engine.spec.rejection import rejection_sample


@dataclass
class TrainConfig:
    depths: int = 4               # K the head is trained for (NTP + depths-1 MTP rows)
    steps: int = 300              # the schedule's length, unless seconds is set
    seconds: float | None = None  # train for this long instead (cosine on elapsed time)
    lr: float = 3e-3
    warmup_steps: int = 20
    batch_size: int = 8           # sequences per step
    cod_ratio: float = 0.7
    cod_min_ratio: float = 0.2
    seed: int = 0
    sync_every: int = 25          # read the loss back (the only host sync) this often


ROW_FIELDS = ("input_ids", "aux", "positions", "is_mask", "depth", "target_logits")


@dataclass
class Rows:
    """Training rows of B sequences, R each, depth-major (every sequence has the same
    number of rows at each depth, `counts`), so the per-depth loss needs no host sync."""
    input_ids: torch.Tensor      # [B, R]
    aux: torch.Tensor            # [B, R, 3 * Ht]
    positions: torch.Tensor      # [B, R]
    is_mask: torch.Tensor        # [B, R] bool (depth > 0)
    depth: torch.Tensor          # [B, R]
    target_logits: torch.Tensor  # [B, R, V]
    mask: torch.Tensor           # [B, R, R] bool
    counts: list[int]            # rows per depth in one sequence

    def flat(self) -> Rows:
        """All rows in one set ([B * R], block-diagonal [B * R, B * R] mask): the layout a
        single dense call of the head takes."""
        return Rows(*(getattr(self, f).flatten(0, 1) for f in ROW_FIELDS),
                    torch.block_diag(*self.mask.unbind(0)), self.counts)


@dataclass
class TrainLog:
    steps: int
    seconds: float
    step_s: float                # steady state: the steps after the first host sync
    losses: list[float]          # every sync_every steps, then the last step's
    top1: list[float]            # the last step's top-1 agreement with the target per depth


# -- data from the target -------------------------------------------------------------

@torch.no_grad()
def target_features(target, token_ids: torch.Tensor, layer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Hugging Face causal LM's taps and logits: (aux [B, N, 3Ht], logits [B, N, V]).
    hidden_states[i] is the input of layer i, the pre-norm residual stream the engine taps."""
    out = target(input_ids=token_ids, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i] for i in layer_ids], dim=-1)
    return aux.float(), out.logits.float()


@torch.no_grad()
def generate_greedy(target, prompts: torch.Tensor, new_tokens: int, banned: list[int] = ()) -> torch.Tensor:
    """The target's own greedy continuations (the data P-EAGLE trains on); `banned`
    ids (the mask token) are never generated."""
    seq = prompts
    for _ in range(new_tokens):
        logits = target(input_ids=seq).logits[:, -1].float()
        if banned:
            logits[:, list(banned)] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


# -- the objective ---------------------------------------------------------------------

def chain_counts(n_tokens: int, depths: int, ratio: float, min_ratio: float) -> list[int]:
    """Anchors kept at each depth of one sequence: all n-1 at depth 0; depth d keeps
    max(r^d, r_min) of its n-1-d labelled anchors, fewer than depth d-1 keeps (so a nested
    choice always exists and every sequence gets the same counts). ratio 1: all of them."""
    counts = [n_tokens - 1]
    for d in range(1, depths):
        valid = n_tokens - 1 - d                        # anchors j <= N - 2 - d have a label
        keep = min(math.ceil(max(ratio ** d, min_ratio) * valid), counts[-1] - 1, valid)
        if keep <= 0:
            break
        counts.append(keep)
    return counts


def sample_chains(batch: int, n_tokens: int, depths: int, ratio: float, min_ratio: float,
                  gen: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor [B, R], depth [B, R]) of the rows trained on each of `batch` sequences,
    depth-major, anchors ascending within a depth; depth d's anchors are a random subset
    of depth d-1's (chains never skip a depth). Drawn on `device`, no host sync."""
    counts = chain_counts(n_tokens, depths, ratio, min_ratio)
    idx = torch.arange(n_tokens - 1, device=device).expand(batch, -1)
    prio = torch.rand(batch, n_tokens - 1, generator=gen, device=device)
    alive, anchors = torch.ones_like(idx, dtype=torch.bool), [idx]
    for d, keep in enumerate(counts[1:], 1):
        score = torch.where(alive & (idx < n_tokens - 1 - d), prio, -1.0)
        pick = score.topk(keep, dim=1).indices.sort(dim=1).values
        alive = torch.zeros_like(alive).scatter_(1, pick, True)
        anchors.append(pick)
    depth = torch.cat([torch.full((c,), d, device=device) for d, c in enumerate(counts)])
    return torch.cat(anchors, 1), depth.expand(batch, -1)


def training_mask(anchor: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """[..., R, R]: query row may see key row (the inference-time causal view, see module doc)."""
    aq, dq = anchor[..., :, None], depth[..., :, None]
    ak, dk = anchor[..., None, :], depth[..., None, :]
    return ((dk == 0) & (ak <= aq)) | ((ak == aq) & (dk <= dq))


def batch_rows(tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor, mask_token_id: int, depths: int,
               ratio: float, min_ratio: float, gen: torch.Generator | None) -> Rows:
    """The rows of each sequence (tokens [B, N], aux [B, N, 3Ht], logits [B, N, V]), on
    their device."""
    n = tokens.shape[1]
    anchor, depth = sample_chains(tokens.shape[0], n, depths, ratio, min_ratio, gen, tokens.device)

    def at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    ids = torch.where(depth == 0, tokens.gather(1, (anchor + 1).clamp(max=n - 1)), mask_token_id)
    return Rows(ids, at(aux, anchor), anchor + depth, depth > 0, depth, at(logits, anchor + depth + 1),
                training_mask(anchor, depth), chain_counts(n, depths, ratio, min_ratio))


def build_rows(tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor, mask_token_id: int,
               cfg: TrainConfig, gen: torch.Generator | None, ratio: float | None = None) -> Rows:
    """batch_rows as one flat row set (see Rows.flat)."""
    r, r_min = (cfg.cod_ratio, cfg.cod_min_ratio) if ratio is None else (ratio, ratio)
    return batch_rows(tokens, aux, logits, mask_token_id, cfg.depths, r, r_min, gen).flat()


def head_logits(head: PEagleHead, rows: Rows) -> torch.Tensor:
    """[B, R, draft_V]: the head over each sequence's rows, batched with vmap. Torch ops
    only: the Triton kernels neither batch under vmap nor have a backward."""
    def one(ids, aux, positions, is_mask, mask):
        return head.compute_logits(head(ids, aux, positions, is_mask, mask)[0])
    with kernel_backend("torch"):
        return torch.func.vmap(one)(rows.input_ids, rows.aux, rows.positions, rows.is_mask, rows.mask)


def loss_fn(head: PEagleHead, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy to the target's distribution, mean per depth then over depths, and
    each depth's top-1 agreement with the target [depths]; both stay on the device."""
    logits = head_logits(head, rows).float()
    target = rows.target_logits.float()
    ce = -(torch.softmax(target, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(-1)     # [B, R]
    hit = (logits.argmax(-1) == target.argmax(-1)).float().mean(0)                       # [R]
    ends = torch.tensor(rows.counts).cumsum(0).tolist()
    spans = list(zip([0] + ends[:-1], ends))
    loss = torch.stack([ce[:, a:b].mean() for a, b in spans]).mean()
    return loss, torch.stack([hit[a:b].mean() for a, b in spans])


# -- building, training, measuring -----------------------------------------------------

def new_head(target_config, layer_ids: list[int] | None, mask_token_id: int, depths: int,
             num_layers: int = 1) -> PEagleHead:
    c = target_config
    heads = c.num_attention_heads
    cfg = PEagleConfig(
        hidden_size=c.hidden_size, num_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size, draft_vocab_size=c.vocab_size, mask_token_id=mask_token_id,
        target_hidden_size=c.hidden_size, aux_layer_ids=list(layer_ids or default_aux_layers(c.num_hidden_layers)),
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        num_speculative_tokens=depths)
    head = PEagleHead(cfg)
    init_random(head, seed=0)
    with torch.no_grad():
        head.mask_hidden.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return head


@torch.no_grad()
def init_from_target(head: PEagleHead, target) -> None:
    """Start the embedding, final norm and LM head from the target's (P-EAGLE then
    trains all of them)."""
    head.embed_tokens.copy_(target.get_input_embeddings().weight.float())
    head.lm_head.copy_(target.get_output_embeddings().weight.float())
    norm = getattr(target.base_model, "norm", None)
    if norm is not None and norm.weight.shape == head.norm.weight.shape:
        head.norm.weight.copy_(norm.weight.float())


def train_head(head: PEagleHead, tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor,
               cfg: TrainConfig, log_every: int = 0) -> TrainLog:
    """AdamW on random minibatches of the given sequences (all on one device, float32:
    features kept in bf16 are widened per batch; bf16 autocast is not used because the
    backward of the vmapped attention's softmax refuses bf16 on CUDA), for cfg.steps or,
    with cfg.seconds, until that much time has passed; warm-up then cosine decay over
    the same measure."""
    dev = tokens.device
    cuda = dev.type == "cuda"
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    head.train().requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    losses: list[float] = []
    t0, step, steady = time.perf_counter(), 0, None
    while True:
        frac = (time.perf_counter() - t0) / cfg.seconds if cfg.seconds else step / cfg.steps
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        pick = torch.randint(tokens.shape[0], (cfg.batch_size,), generator=gen, device=dev)
        rows = batch_rows(tokens[pick], aux[pick].float(), logits[pick].float(), head.mask_token_id, cfg.depths,
                          cfg.cod_ratio, cfg.cod_min_ratio, gen)
        loss, top1 = loss_fn(head, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        if step % cfg.sync_every == 0:
            losses.append(float(loss.detach()))   # waits for the device: the loop's only sync
            steady = steady or (step, time.perf_counter())
            if log_every and step % log_every < cfg.sync_every:
                print(f"step {step} loss {losses[-1]:.3f} top-1 per depth {[round(a, 2) for a in top1.tolist()]}")
    if step % cfg.sync_every:
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    head.eval().requires_grad_(False)
    step_s = (time.perf_counter() - steady[1]) / (step - steady[0]) if steady and step > steady[0] else seconds / step
    return TrainLog(step, seconds, step_s, losses, top1.tolist())


@torch.no_grad()
def acceptance_length(head: PEagleHead, tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor,
                      num_spec: int, first_anchor: int = 0, chunk: int = 16) -> tuple[float, torch.Tensor]:
    """Greedy speculation on sequences the target generated greedily from index
    first_anchor + 2 on: for each anchor j the head drafts K tokens (its dense view
    equals inference's), the rejection sampler verifies them against the target's
    logits at j+1..j+K+1. -> (mean acceptance length, accepted-per-position rates [K]).
    `chunk` sequences at a time (the dense mask grows with the square of the rows)."""
    N = tokens.shape[1]
    dev = tokens.device
    starts = [0] + torch.tensor(chain_counts(N, num_spec, 1.0, 1.0)).cumsum(0).tolist()
    anchors = torch.arange(first_anchor, N - 1 - num_spec, device=dev)
    accepted = []
    for at in range(0, tokens.shape[0], chunk):
        tok, ax, lg = tokens[at:at + chunk], aux[at:at + chunk].float(), logits[at:at + chunk].float()
        rows = batch_rows(tok, ax, lg, head.mask_token_id, num_spec, 1.0, 1.0, None)
        pred = head.to_target_ids(head_logits(head, rows).argmax(-1))                  # [b, R]
        # With ratio 1, depth d's rows are anchors 0, 1, ... in order, from starts[d].
        drafts = torch.stack([pred[:, starts[d] + anchors] for d in range(num_spec)], -1).reshape(-1, num_spec)
        target_rows = lg[:, anchors[:, None] + 1 + torch.arange(num_spec + 1, device=dev)].reshape(-1, lg.shape[-1])
        n = drafts.shape[0]
        zeros = torch.zeros(n, dtype=torch.int64, device=dev)
        out = rejection_sample(target_rows, drafts, torch.full((n,), num_spec, device=dev),
                               torch.zeros(n, device=dev), zeros, zeros)
        accepted.append(out.num_accepted)
    accepted = torch.cat(accepted)
    per_position = torch.stack([(accepted > k).float().mean() for k in range(num_spec)])
    return 1.0 + float(accepted.float().mean()), per_position


def main(argv: list[str] | None = None) -> None:
    """Minimal CLI: greedy data from random prompts of a Hugging Face target folder."""
    from transformers import AutoModelForCausalLM
    p = argparse.ArgumentParser(description="Train a P-EAGLE head for a target (writes the speculators layout)")
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mask-token-id", type=int, required=True, help="an id the target never generates")
    p.add_argument("--layers", type=int, nargs=3, default=None, help="target layers to tap")
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=56)
    for f, v in asdict(TrainConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=float if v is None else type(v), default=v)
    a = p.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    target = AutoModelForCausalLM.from_pretrained(a.target).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, target.config.vocab_size, (a.sequences, a.prompt_len), generator=gen)
    tokens = generate_greedy(target, prompts, a.new_tokens, banned=[a.mask_token_id])
    head = new_head(target.config, a.layers, a.mask_token_id, cfg.depths, a.num_layers)
    init_from_target(head, target)
    aux, logits = target_features(target, tokens, head.cfg.aux_layer_ids)
    log = train_head(head, tokens, aux, logits, cfg, log_every=cfg.sync_every)
    al, _ = acceptance_length(head, tokens, aux, logits, cfg.depths, a.prompt_len - 2)
    print(f"training-set acceptance length at K={cfg.depths}: {al:.2f}")
    save_head(head, Path(a.out), "speculators", verifier=a.target,
              extra_config={"tandem_training": dict(asdict(cfg), steps=log.steps, final_loss=log.losses[-1])})


if __name__ == "__main__":
    main()
