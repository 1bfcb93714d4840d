"""Tiny P-EAGLE heads and the engine's paged-attention plumbing for the spec tests."""

from pathlib import Path

import torch

from engine.models.loader import init_random
from engine.ops.attention import AttentionMetadata
from engine.spec.checkpoint import save_head
from engine.spec.config import PEagleConfig
from engine.spec.head import PEagleHead
from engine.spec.train import (
    TrainConfig,
    generate_greedy,
    init_from_target,
    new_head,
    target_features,
    train_head,
)


def trained_head(model, folder: Path, layers: list[int] | None, mask_id: int, depths: int, steps: int,
                 num_sequences: int = 24, num_layers: int = 1) -> Path:
    """A head for `model` trained for `steps` on its greedy continuations (20 tokens) of
    `num_sequences` random 4-token prompts, saved in `folder`: briefly, so that
    verification accepts some drafts and rejects others."""
    prompts = torch.randint(0, mask_id, (num_sequences, 4), generator=torch.Generator().manual_seed(0))
    tokens = generate_greedy(model, prompts, 20, banned=[mask_id])
    aux, logits = target_features(model, tokens, layers)
    head = new_head(model.config, layers, mask_id, depths=depths, num_layers=num_layers)
    init_from_target(head, model)
    train_head(head, tokens, aux, logits, TrainConfig(depths=depths, steps=steps, batch_size=4, lr=3e-3))
    return save_head(head, folder)


def tiny_config(**overrides) -> PEagleConfig:
    fields = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=48, vocab_size=61, draft_vocab_size=61, mask_token_id=60,
                  target_hidden_size=24, aux_layer_ids=[1, 2, 3], max_position_embeddings=256)
    fields.update(overrides)
    return PEagleConfig(**fields)


def random_head(seed: int = 0, **overrides) -> PEagleHead:
    head = PEagleHead(tiny_config(**overrides))
    init_random(head, seed)
    with torch.no_grad():   # non-trivial norms and mask_hidden, so a misplaced one shows
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        head.mask_hidden.copy_(torch.randn(head.mask_hidden.shape, generator=g))
    return head.eval()


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """Dense [T, T] mask: causal inside each request's rows, nothing across requests."""
    blocks = [torch.ones(n, n, dtype=torch.bool).tril() for n in lengths]
    return torch.block_diag(*blocks)


class PagedCache:
    """A KV cache for the head's layers and the metadata of one step over it."""

    def __init__(self, head: PEagleHead, num_reqs: int, block_size: int = 4, blocks_per_req: int = 8) -> None:
        cfg = head.cfg
        self.block_size = block_size
        self.block_table = torch.arange(num_reqs * blocks_per_req, dtype=torch.int32).view(num_reqs, -1)
        shape = (num_reqs * blocks_per_req, block_size, cfg.num_key_value_heads, cfg.head_dim)
        for layer in head.layers:
            layer.self_attn.attn.k_cache = torch.zeros(shape)
            layer.self_attn.attn.v_cache = torch.zeros(shape)

    def step(self, positions_per_req: list[list[int]]) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        """Metadata for rows at the given positions (each request's rows contiguous and
        ending at its current length); -> (meta, positions [T], query_start_loc)."""
        lens = [len(p) for p in positions_per_req]
        qsl = torch.tensor([0] + lens).cumsum(0).int()
        pos = torch.tensor([p for ps in positions_per_req for p in ps])
        req = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        slots = self.block_table[req, pos // self.block_size].long() * self.block_size + pos % self.block_size
        seq_lens = [ps[-1] + 1 for ps in positions_per_req]
        meta = AttentionMetadata(num_reqs=len(lens), query_start_loc=qsl, seq_lens=torch.tensor(seq_lens).int(),
                                 block_table=self.block_table, slot_mapping=slots, block_size=self.block_size,
                                 query_lens_cpu=lens, seq_lens_cpu=seq_lens)
        return meta, pos, qsl


def dense_drafts(head: PEagleHead, model, known: list[int], k: int, mask_id: int, layers: list[int]) -> list[int]:
    """The head's k drafts after `known` as the trainer sees them (engine/spec/train.py):
    rows for every anchor of the whole sequence, densely. The NTP row sits at n-2 (token
    x_{n-1}, taps at n-2) and depth-d rows at n-2+d, drafting x_n..x_{n+k-1}; the trainer
    builds rows only for anchors with labels, so placeholders extend the sequence (rows
    past the anchor see none)."""
    from engine.spec.train import TrainConfig, build_rows, target_features
    n = len(known)
    seq = torch.tensor([known])
    aux, logits = target_features(model, seq, layers)
    ext = torch.cat([seq, torch.zeros(1, k + 1, dtype=seq.dtype)], 1)
    aux_e = torch.cat([aux, torch.zeros(1, k + 1, aux.shape[-1])], 1)
    rows = build_rows(ext, aux_e, torch.zeros(1, ext.shape[1], logits.shape[-1]), mask_id,
                      TrainConfig(depths=k), None, ratio=1.0)
    with torch.no_grad():
        normed, _ = head(rows.input_ids, rows.aux, rows.positions, rows.is_mask, rows.mask)
        ids = head.to_target_ids(head.compute_logits(normed).argmax(-1))
    return [int(ids[(rows.depth == d) & (rows.positions == n - 2 + d)][0]) for d in range(k)]
