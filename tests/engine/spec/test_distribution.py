"""With random sampling, speculative decoding leaves the output distribution exactly the
target's: on a 4-token vocabulary, 6000 seeded requests of 4 tokens with K = 2 (the
second step verifies 2 drafts, so accept/accept, accept/reject and reject paths all
occur) are binned over the 256 possible outputs and compared with the target's exact
probabilities (transformers, chain rule) by a chi-square test at alpha = 0.001. The
same samples against a slightly different distribution (temperature 1.25) fail it, so
the test has the power to see a wrong sampler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.spec.checkpoint import save_head
from engine.spec.train import TrainConfig, init_from_target, new_head, target_features, train_head

V, NEW, N, K = 3, 4, 3000, 2
PROMPT = [1, 2, 0, 2, 1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 4-layer Llama over 3 tokens (weights large enough for uneven but not degenerate
    next-token distributions) and its head."""
    root = tmp_path_factory.mktemp("tiny_vocab")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = None
    model.save_pretrained(str(root / "target"))
    # A head trained briefly on the target's distributions over random text, so that
    # drafts are accepted often enough for every verification path to matter.
    head = new_head(config, [1, 2, 3], mask_token_id=2, depths=K)
    init_from_target(head, model)
    tokens = torch.randint(0, V, (64, 12), generator=torch.Generator().manual_seed(0))
    aux, logits = target_features(model, tokens, [1, 2, 3])
    train_head(head, tokens, aux, logits, TrainConfig(depths=K, steps=60, batch_size=8, lr=1e-2))
    save_head(head, root / "head")
    return root, model


def exact_probs(model, temperature: float = 1.0) -> dict[tuple[int, ...], float]:
    """P(output) for every output of NEW tokens, by the chain rule over the target's logits."""
    outs = list(itertools.product(range(V), repeat=NEW))
    seqs = torch.tensor([PROMPT + list(o) for o in outs])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seqs).logits.double() / temperature, -1)
    n = len(PROMPT)
    pos = torch.arange(n - 1, n - 1 + NEW)
    lp = logp[torch.arange(len(outs))[:, None], pos[None], seqs[:, n:]].sum(-1)
    return dict(zip(outs, lp.exp().tolist()))


def chi_square(counts: dict, probs: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over the outputs, cells expecting fewer than 5 merged into one;
    -> (statistic, degrees of freedom)."""
    stat, rest_obs, rest_exp, cells = 0.0, 0, 0.0, 0
    for out, p in probs.items():
        e, o = p * total, counts.get(out, 0)
        if e < 5:
            rest_obs, rest_exp = rest_obs + o, rest_exp + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        cells += 1
    return stat, cells - 1


def chi_square_quantile(df: int, z: float = 3.090) -> float:
    """The chi-square quantile at the normal quantile z (3.090: alpha = 0.001), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_has_the_target_distribution(pair):
    root, model = pair
    probs = exact_probs(model)
    assert max(probs.values()) < 0.5        # not degenerate: many outputs are likely
    llm = LLM(str(root / "target"), block_size=4, max_num_seqs=256, max_num_batched_tokens=2048,
              speculative_config={"method": "peagle", "model": str(root / "head"), "num_speculative_tokens": K})
    params = [SamplingParams(max_tokens=NEW, temperature=1.0, seed=s, ignore_eos=True) for s in range(N)]
    counts: dict[tuple[int, ...], int] = {}
    for o in llm.generate([PROMPT] * N, params):
        out = tuple(o.outputs[0].token_ids)
        counts[out] = counts.get(out, 0) + 1
    st = llm.engine.spec_stats
    # Both outcomes of verification occur often: drafts are accepted and rejected.
    assert 0.2 < st.num_accepted_tokens / st.num_draft_tokens < 0.8
    assert st.accepted_per_position[1] > 0.05 * st.num_drafts
    stat, df = chi_square(counts, probs, N)
    limit = chi_square_quantile(df)
    wrong, wdf = chi_square(counts, exact_probs(model, temperature=1.25), N)
    print(f"acceptance {st.num_accepted_tokens / st.num_draft_tokens:.2f}, chi-square {stat:.1f} over {df} "
          f"degrees of freedom (limit {limit:.1f}); against temperature 1.25: {wrong:.1f}")
    assert stat < limit, f"chi-square {stat:.1f} over {df} degrees of freedom (limit {limit:.1f})"
    assert wrong > chi_square_quantile(wdf), f"a temperature-1.25 target is not told apart ({wrong:.1f})"
