"""NemotronH multi-token prediction (Super's `mtp.*` weights), kept for speculative
decoding and never run by the main model's forward.

One MTP step is a short stack of NemotronH blocks (`mtp_layers_block_type`, legacy
`mtp_hybrid_override_pattern`, "*E" in Super: `mtp.layers.0` attention without
positional encoding, `mtp.layers.1` MoE/LatentMoE). Its first block also holds
`enorm`, `hnorm` and `eh_proj` [H, 2H], its last `final_layernorm`:

    h0 = eh_proj(cat(enorm(embed(next_token)), hnorm(h_target)))
    h  = blocks(h0)                     # pre-norm residual blocks, as in the main stack
    out = final_layernorm(h + residual) # logits: the main model's lm_head

as vLLM's NemotronH MTP does; `h_target` is the target's hidden state after its final
norm at the previous position. Embedding and LM head are the main model's (no copies
here). The attention block's KV cache is the drafter's to bind (`attention_layers()`):
the runner sizes and binds the main model's attention layers only. Under expert
parallelism its MoE holds this rank's expert slots (as the stack's do) but is not
attached to the dispatch (`moe_layers()` lists the main stack's only).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.norm import RMSNorm
from engine.layers.params import Linear
from engine.models.nemotron_h import ATTENTION, MAMBA, MLP, MOE, NemotronHBlock
from engine.ops.attention import AttentionMetadata


class MTPBlock(NemotronHBlock):
    def __init__(self, c, kind: str, first: bool, last: bool) -> None:
        super().__init__(c, kind)
        h, eps = c.hidden_size, c.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(h, eps)
            self.hnorm = RMSNorm(h, eps)
            self.eh_proj = Linear(2 * h, h)
        if last:
            self.final_layernorm = RMSNorm(h, eps)


class NemotronHMTP(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        n = int(c.num_nextn_predict_layers)
        if n != 1:
            # Checkpoints with one step reuse it for every draft token (vLLM asserts the
            # same); how several steps' blocks would be named is not known.
            raise ValueError(f"NemotronH config: num_nextn_predict_layers={n} is not supported; the MTP block "
                             f"loads one step (1), reused for every draft token")
        kinds = list(getattr(c, "mtp_layers_block_type", None) or [ATTENTION, MOE])
        bad = sorted({k for k in kinds if k not in (ATTENTION, MOE, MLP)}, key=str)
        if bad:
            # A Mamba block would need its own state slot per request, which nothing sizes.
            raise ValueError(f"NemotronH config: mtp_layers_block_type has layer types {bad} that the MTP block "
                             f"cannot build; use {ATTENTION!r}, {MOE!r} or {MLP!r} "
                             f"(mtp_hybrid_override_pattern letters *, E, -), not {MAMBA!r}")
        self.layers = nn.ModuleList(MTPBlock(c, kind, i == 0, i == len(kinds) - 1) for i, kind in enumerate(kinds))

    def attention_layers(self) -> list[nn.Module]:
        return [b.mixer.attn for b in self.layers if b.kind == ATTENTION]

    def forward(self, inputs_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """inputs_embeds: the main model's `embed_tokens[next_ids]` [T, H]; hidden: the
        target's normed hidden state at the previous position [T, H] -> the normed MTP
        hidden state [T, H], for the main model's `compute_logits`."""
        first = self.layers[0]
        h = first.eh_proj(torch.cat([first.enorm(inputs_embeds), first.hnorm(hidden)], dim=-1))
        residual = None
        for block in self.layers:
            h, residual = block(h, residual, positions, meta)
        return self.layers[-1].final_layernorm(h, residual)[0]
