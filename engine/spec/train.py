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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.models.loader import init_random
from engine.spec.checkpoint import save_head
from engine.spec.config import PEagleConfig, default_aux_layers
from engine.spec.head import PEagleHead
from engine.spec.rejection import rejection_sample


@dataclass
class TrainConfig:
    depths: int = 4               # K the head is trained for (NTP + depths-1 MTP rows)
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 8
    cod_ratio: float = 0.7
    cod_min_ratio: float = 0.2
    seed: int = 0


@dataclass
class Rows:
    """One packed training batch."""
    input_ids: torch.Tensor      # [R]
    aux: torch.Tensor            # [R, 3 * Ht]
    positions: torch.Tensor      # [R]
    is_mask: torch.Tensor        # [R] bool (depth > 0)
    depth: torch.Tensor          # [R]
    target_logits: torch.Tensor  # [R, V]
    mask: torch.Tensor           # [R, R] bool


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

def sample_chains(n_tokens: int, depths: int, ratio: float, min_ratio: float,
                  gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor [R], depth [R]) of the rows trained on one sequence. ratio 1: all of them."""
    anchors, ds = [torch.arange(n_tokens - 1)], [torch.zeros(n_tokens - 1, dtype=torch.long)]
    alive = anchors[0]
    for d in range(1, depths):
        valid = n_tokens - 1 - d                        # anchors j <= N - 2 - d have a label
        alive = alive[alive < valid]
        keep = min(alive.numel(), math.ceil(max(ratio ** d, min_ratio) * valid))
        if keep < alive.numel():
            alive = alive[torch.randperm(alive.numel(), generator=gen)[:keep]].sort().values
        if alive.numel() == 0:
            break
        anchors.append(alive)
        ds.append(torch.full_like(alive, d))
    return torch.cat(anchors), torch.cat(ds)


def training_mask(anchor: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """[R, R]: query row may see key row (the inference-time causal view, see module doc)."""
    aq, dq = anchor[:, None], depth[:, None]
    ak, dk = anchor[None, :], depth[None, :]
    return ((dk == 0) & (ak <= aq)) | ((ak == aq) & (dk <= dq))


def build_rows(tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor, mask_token_id: int,
               cfg: TrainConfig, gen: torch.Generator | None, ratio: float | None = None) -> Rows:
    """Pack one row set per sequence (tokens [B, N], aux [B, N, 3Ht], logits [B, N, V])
    with a block-diagonal mask."""
    parts = []
    for b in range(tokens.shape[0]):
        anchor, depth = sample_chains(tokens.shape[1], cfg.depths, cfg.cod_ratio if ratio is None else ratio,
                                      cfg.cod_min_ratio if ratio is None else ratio, gen)
        anchor, depth = anchor.to(tokens.device), depth.to(tokens.device)
        ids = torch.where(depth == 0, tokens[b, (anchor + 1).clamp(max=tokens.shape[1] - 1)], mask_token_id)
        parts.append(Rows(ids, aux[b, anchor], anchor + depth, depth > 0, depth,
                          logits[b, anchor + depth + 1], training_mask(anchor, depth)))
    return Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in
                  ("input_ids", "aux", "positions", "is_mask", "depth", "target_logits")),
                torch.block_diag(*[p.mask for p in parts]))


def head_logits(head: PEagleHead, rows: Rows) -> torch.Tensor:
    normed, _ = head(rows.input_ids, rows.aux, rows.positions, rows.is_mask, rows.mask)
    return head.compute_logits(normed)


def loss_fn(head: PEagleHead, rows: Rows) -> tuple[torch.Tensor, list[float]]:
    """Per-depth mean cross-entropy to the target's distribution, averaged over depths;
    also each depth's top-1 agreement with the target."""
    logits = head_logits(head, rows)
    target_p = torch.softmax(rows.target_logits, dim=-1)
    ce = -(target_p * torch.log_softmax(logits, dim=-1)).sum(-1)
    hit = (logits.argmax(-1) == rows.target_logits.argmax(-1)).float()
    depths = [d for d in range(int(rows.depth.max()) + 1) if bool((rows.depth == d).any())]
    loss = sum(ce[rows.depth == d].mean() for d in depths) / len(depths)
    return loss, [float(hit[rows.depth == d].mean()) for d in depths]


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
    """Start the embedding and LM head from the target's (P-EAGLE then trains both)."""
    head.embed_tokens.copy_(target.get_input_embeddings().weight.float())
    head.lm_head.copy_(target.get_output_embeddings().weight.float())


def train_head(head: PEagleHead, tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor,
               cfg: TrainConfig, log_every: int = 0) -> list[float]:
    """Adam on minibatches of the given sequences; returns the loss per step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    head.train().requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    losses = []
    for step in range(cfg.steps):
        pick = torch.randperm(tokens.shape[0], generator=gen)[:cfg.batch_size]
        rows = build_rows(tokens[pick], aux[pick], logits[pick], head.mask_token_id, cfg, gen)
        loss, acc = loss_fn(head, rows)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and step % log_every == 0:
            print(f"step {step} loss {losses[-1]:.3f} top-1 per depth {[round(a, 2) for a in acc]}")
    head.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def acceptance_length(head: PEagleHead, tokens: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor,
                      num_spec: int, first_anchor: int = 0, chunk: int = 4) -> tuple[float, torch.Tensor]:
    """Greedy speculation on sequences the target generated greedily from index
    first_anchor + 2 on: for each anchor j the head drafts K tokens (its dense view
    equals inference's), the rejection sampler verifies them against the target's
    logits at j+1..j+K+1. -> (mean acceptance length, accepted-per-position rates [K]).
    `chunk` sequences at a time (the dense mask grows with the square of the rows)."""
    cfg = TrainConfig(depths=num_spec)
    N = tokens.shape[1]
    dev = tokens.device
    per_seq = [N - 1 - d for d in range(num_spec)]          # rows per depth in one sequence
    offsets = torch.tensor([0] + per_seq).cumsum(0).tolist()
    anchors = torch.arange(first_anchor, N - 1 - num_spec, device=dev)
    accepted = []
    for at in range(0, tokens.shape[0], chunk):
        tok, ax, lg = tokens[at:at + chunk], aux[at:at + chunk], logits[at:at + chunk]
        rows = build_rows(tok, ax, lg, head.mask_token_id, cfg, None, ratio=1.0)
        pred = head.to_target_ids(head_logits(head, rows).argmax(-1))
        drafts, targets = [], []
        for b in range(tok.shape[0]):
            base = b * offsets[-1]
            drafts.append(torch.stack([pred[base + offsets[d] + anchors] for d in range(num_spec)], 1))
            targets.append(lg[b, anchors[:, None] + 1 + torch.arange(num_spec + 1, device=dev)])
        drafts = torch.cat(drafts)
        target_rows = torch.cat(targets).reshape(-1, lg.shape[-1])
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
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = p.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    target = AutoModelForCausalLM.from_pretrained(a.target).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, target.config.vocab_size, (a.sequences, a.prompt_len), generator=gen)
    tokens = generate_greedy(target, prompts, a.new_tokens, banned=[a.mask_token_id])
    head = new_head(target.config, a.layers, a.mask_token_id, cfg.depths, a.num_layers)
    init_from_target(head, target)
    aux, logits = target_features(target, tokens, head.cfg.aux_layer_ids)
    losses = train_head(head, tokens, aux, logits, cfg, log_every=max(1, cfg.steps // 20))
    al, _ = acceptance_length(head, tokens, aux, logits, cfg.depths, a.prompt_len - 2)
    print(f"training-set acceptance length at K={cfg.depths}: {al:.2f}")
    save_head(head, Path(a.out), "speculators", verifier=a.target,
              extra_config={"tandem_training": dict(asdict(cfg), final_loss=losses[-1])})


if __name__ == "__main__":
    main()
