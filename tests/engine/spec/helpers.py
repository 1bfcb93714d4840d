"""Tiny P-EAGLE heads and the engine's paged-attention plumbing for the spec tests."""

import torch

from engine.models.loader import init_random
from engine.ops.attention import AttentionMetadata
from engine.spec.config import PEagleConfig
from engine.spec.head import PEagleHead


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
