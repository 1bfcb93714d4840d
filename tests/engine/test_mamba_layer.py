"""The engine's Mamba-2 mixer against transformers' NemotronH mixer (tiny random
config): a batch of requests through mixed steps (fresh prefills, a prefill split over
two steps, decodes next to a prefill chunk, pure decode steps) gives the outputs that
transformers computes one sequence at a time with its cache."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from engine.kernels import kernel_backend
from engine.layers.mamba import HybridMetadata, Mamba2Mixer, MambaShape

CFG = dict(vocab_size=256, hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
           conv_kernel=4, chunk_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           moe_shared_expert_intermediate_size=48)
# Per request: prompt length, then the scheduled tokens of each step (0: not in the step).
PROMPTS = [5, 11, 1]
STEPS = [[5, 6, 1], [1, 5, 1], [1, 1, 1], [1, 1, 0]]


def mamba_shape(c) -> MambaShape:
    return MambaShape(c.hidden_size, c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size,
                      c.conv_kernel, c.chunk_size, c.layer_norm_epsilon, c.use_conv_bias, c.use_bias)


def _hf_mixer():
    config = transformers.NemotronHConfig(**CFG)
    torch.manual_seed(0)
    hf = NemotronHMamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
        hf.D.uniform_(0.5, 1.5)
        hf.norm.weight.uniform_(0.5, 1.5)
        hf.conv1d.bias.normal_(0.0, 0.1)
        hf.dt_bias.uniform_(0.5, 1.0)     # dt stays above transformers' prefill clamp (reference/models.md)
    return config, hf


def _metadata(nsched: list[int], done: list[int], slots: list[int]) -> HybridMetadata:
    rows = [i for i, n in enumerate(nsched) if n]
    q = [nsched[i] for i in rows]
    seq = [done[i] + nsched[i] for i in rows]
    qsl = torch.tensor([0] + torch.tensor(q).cumsum(0).tolist(), dtype=torch.int32)
    return HybridMetadata(len(rows), qsl, torch.tensor(seq, dtype=torch.int32), torch.zeros(len(rows), 1,
                          dtype=torch.int32), torch.full((sum(q),), -1), 16, q, seq,
                          state_slots=torch.tensor([slots[i] for i in rows], dtype=torch.int32),
                          has_initial_state=torch.tensor([done[i] > 0 for i in rows]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixer_matches_transformers_through_mixed_steps(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on CPU under TRITON_INTERPRET=1")
    config, hf = _hf_mixer()
    ours = Mamba2Mixer(mamba_shape(config))
    missing = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing.missing_keys
    s = ours.s
    ours.conv_state = torch.randn(5, 2, s.conv_kernel - 1, s.conv_dim)[:, 1]     # slots hold stale data
    ours.ssm_state = torch.randn(5, 2, s.num_heads, s.head_dim, s.d_state)[:, 0]
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(sum(st[i] for st in STEPS), 64, generator=g) for i in range(len(PROMPTS))]
    slots, done = [3, 0, 4], [0, 0, 0]
    got: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    with torch.no_grad(), kernel_backend(backend):
        for nsched in STEPS:
            meta = _metadata(nsched, done, slots)
            x = torch.cat([inputs[i][done[i]:done[i] + n] for i, n in enumerate(nsched) if n])
            out = ours(x, meta)
            start = 0
            for i, n in enumerate(nsched):
                if n:
                    got[i].append(out[start:start + n])
                    start += n
                    done[i] += n
        for i, p in enumerate(PROMPTS):
            cache = DynamicCache(config=config)
            ref = [hf(inputs[i][None, :p], cache=cache)[0]]
            ref += [hf(inputs[i][None, t:t + 1], cache=cache)[0] for t in range(p, done[i])]
            assert torch.allclose(torch.cat(got[i]), torch.cat(ref), atol=2e-5, rtol=1e-4), \
                (torch.cat(got[i]) - torch.cat(ref)).abs().max()
