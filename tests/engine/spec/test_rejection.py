"""Rejection sampler: greedy semantics, the Triton kernel against the reference, batch
independence, and a chi-square test that the output distribution is the target's."""

import pytest
import torch

from engine.spec.rejection import rejection_sample


def _random_case(seed: int, B: int = 16, K: int = 4, V: int = 33):
    """Mixed greedy/random rows, per-request draft counts (some 0), drafts that are
    sometimes the target's argmax or a likely token, so both branches run."""
    g = torch.Generator().manual_seed(seed)
    nd = torch.randint(0, K + 1, (B,), generator=g)
    T = int((nd + 1).sum())
    logits = torch.randn(T, V, generator=g) * 3
    starts = torch.cumsum(nd + 1, 0) - (nd + 1)
    drafts = torch.randint(0, V, (B, K), generator=g)
    for b in range(B):
        for j in range(int(nd[b])):
            if torch.rand((), generator=g) < 0.6:
                drafts[b, j] = logits[starts[b] + j].argmax()
    temp = torch.where(torch.rand(B, generator=g) < 0.3, 0.0, 0.5 + torch.rand(B, generator=g))
    seeds = torch.randint(0, 2 ** 62, (B,), generator=g)
    pos = torch.randint(0, 5000, (B,), generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1)
    return logits, drafts, nd, temp, seeds, pos, q


def test_greedy_accepts_the_matching_prefix_then_corrects():
    V = 10
    # Request 0: 3 drafts, target argmax per row = 1, 2, 3, 4; drafts 1, 2, 9 -> [1, 2, 3].
    # Request 1: 2 drafts, both match -> [5, 6] plus the bonus argmax 7.
    # Request 2: no drafts -> just the argmax 8.
    tops = [1, 2, 3, 4, 5, 6, 7, 8]
    logits = torch.full((len(tops), V), -1.0)
    logits[torch.arange(len(tops)), torch.tensor(tops)] = 5.0
    drafts = torch.tensor([[1, 2, 9], [5, 6, 0], [0, 0, 0]])
    nd = torch.tensor([3, 2, 0])
    zeros = torch.zeros(3)
    for backend in ("torch", "triton"):
        out = rejection_sample(logits, drafts, nd, zeros, torch.zeros(3, dtype=torch.int64),
                               torch.zeros(3, dtype=torch.int64), backend=backend)
        assert out.token_ids.tolist() == [[1, 2, 3, -1], [5, 6, 7, -1], [8, -1, -1, -1]]
        assert out.num_sampled.tolist() == [3, 3, 1]
        assert out.num_accepted.tolist() == [2, 2, 0]


@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("with_filters", [False, True])
def test_kernel_matches_reference(with_q, with_filters):
    logits, drafts, nd, temp, seeds, pos, q = _random_case(1 + 2 * with_q + with_filters)
    B = drafts.shape[0]
    kw = {}
    if with_filters:
        g = torch.Generator().manual_seed(7)
        kw = dict(top_k=torch.randint(0, 12, (B,), generator=g),
                  top_p=torch.where(torch.rand(B, generator=g) < 0.5, 1.0, 0.7),
                  min_p=torch.where(torch.rand(B, generator=g) < 0.3, 0.05, 0.0))
    dp = q if with_q else None
    ref = rejection_sample(logits, drafts, nd, temp, seeds, pos, dp, backend="torch", **kw)
    tri = rejection_sample(logits, drafts, nd, temp, seeds, pos, dp, backend="triton", **kw)
    assert torch.equal(ref.token_ids, tri.token_ids)
    assert torch.equal(ref.num_sampled, tri.num_sampled)
    # The case exercises acceptance, rejection and bonus tokens.
    assert (ref.num_sampled > 1).any() and (ref.num_sampled == nd + 1).any() and (ref.num_sampled <= nd).any()


def test_explicit_logit_offsets_and_padding_rows():
    """cu_num_logits may leave gaps (padded rows the sampler must not read)."""
    logits, drafts, nd, temp, seeds, pos, q = _random_case(5, B=6)
    starts = torch.cumsum(nd + 1, 0) - (nd + 1)
    gapped = torch.cat([torch.full((1, logits.shape[1]), float("nan")), logits])
    gapped = torch.cat([gapped[:1 + int(starts[3])], torch.full((2, logits.shape[1]), float("nan")),
                        gapped[1 + int(starts[3]):]])
    cu = starts + 1 + torch.where(torch.arange(6) >= 3, 2, 0)
    want = rejection_sample(logits, drafts, nd, temp, seeds, pos, q, backend="torch")
    for backend in ("torch", "triton"):
        got = rejection_sample(gapped, drafts, nd, temp, seeds, pos, q, cu_num_logits=cu, backend=backend)
        assert torch.equal(got.token_ids, want.token_ids)


def test_results_do_not_depend_on_batch_composition():
    logits, drafts, nd, temp, seeds, pos, q = _random_case(9, B=8)
    full = rejection_sample(logits, drafts, nd, temp, seeds, pos, q, backend="torch")
    starts = torch.cumsum(nd + 1, 0) - (nd + 1)
    for b in (0, 5, 7):
        rows = logits[starts[b]:starts[b] + nd[b] + 1]
        one = rejection_sample(rows, drafts[b:b + 1], nd[b:b + 1], temp[b:b + 1], seeds[b:b + 1],
                               pos[b:b + 1], q[b:b + 1], backend="triton")
        assert torch.equal(one.token_ids[0], full.token_ids[b])


# -- the output distribution is the target's ---------------------------------------------

V, K, N = 4, 3, 40_000


def _chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Over the cells the target can produce; a count in any other cell is a failure."""
    possible = expected > 0
    if counts[~possible].sum() > 0:
        return 0.0
    counts, expected = counts[possible], expected[possible]
    assert expected.min() > 5          # the chi-square approximation holds
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def _markov_round(target_logits: torch.Tensor, temperature: float, draft_logp: torch.Tensor,
                  claimed_q: torch.Tensor | None, greedy_drafts: bool, top_k: int = 0):
    """One verification round per seed for a Markov target p(next | prev) and a Markov
    draft; the round's tokens are then completed to 3 tokens by sampling the target
    directly. Returns counts over the V**3 sequences and their exact probabilities."""
    g = torch.Generator().manual_seed(1234)
    x0 = 0
    q_table = draft_logp.exp()
    prev = torch.full((N,), x0)
    drafts, probs, rows = [], [], [target_logits[prev]]
    for _ in range(K):
        q = q_table[prev]
        d = q.argmax(-1) if greedy_drafts else torch.multinomial(q, 1, generator=g)[:, 0]
        drafts.append(d)
        probs.append(q if claimed_q is None else claimed_q[prev])
        rows.append(target_logits[d])
        prev = d
    drafts = torch.stack(drafts, 1)
    draft_probs = None if greedy_drafts else torch.stack(probs, 1)
    logits = torch.stack(rows, 1).reshape(N * (K + 1), V)        # request-major rows
    seeds = torch.arange(N, dtype=torch.int64) * 7919 + 17
    kw = dict(top_k=torch.full((N,), top_k)) if top_k else {}
    out = rejection_sample(logits, drafts, torch.full((N,), K), torch.full((N,), temperature), seeds,
                           torch.full((N,), 100), draft_probs, backend="torch", **kw)
    scaled = target_logits / temperature
    if top_k:
        kth = scaled.topk(top_k, -1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    p_table = torch.softmax(scaled, -1)
    seqs = out.token_ids[:, :3].clone()
    for j in range(3):       # complete short rounds from the target itself
        short = seqs[:, j] < 0
        prev_tok = torch.full((N,), x0) if j == 0 else seqs[:, j - 1]
        fresh = torch.multinomial(p_table[prev_tok], 1, generator=g)[:, 0]
        seqs[:, j] = torch.where(short, fresh, seqs[:, j])
    counts = torch.bincount(seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2], minlength=V ** 3).double()
    a = torch.arange(V)
    joint = (p_table[x0][:, None, None] * p_table[a][:, :, None] * p_table[a][None, :, :]).reshape(-1)
    return counts, joint.double() * N, out


@pytest.fixture(scope="module")
def tables():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(V, V, generator=g)
    draft = torch.log_softmax(target + torch.randn(V, V, generator=g) * 0.8, -1)   # close, not equal
    return target, draft


@pytest.mark.parametrize("temperature,greedy_drafts,top_k", [(1.0, False, 0), (0.7, False, 3), (1.0, True, 0)])
def test_output_distribution_equals_target(tables, temperature, greedy_drafts, top_k):
    target, draft = tables
    counts, expected, out = _markov_round(target, temperature, draft, None, greedy_drafts, top_k)
    # Deterministic given the seeds; a correct sampler fails this with probability 1e-3.
    assert _chi_square_pvalue(counts, expected) > 1e-3
    # The drafts were useful: the round often emitted more than one token.
    assert out.num_sampled.float().mean() > 1.5


def test_chi_square_detects_a_wrong_draft_distribution(tables):
    """Control: the same test rejects a sampler told the wrong q (uniform) for drafts
    that really came from the draft model, so it can fail."""
    target, draft = tables
    counts, expected, _ = _markov_round(target, 1.0, draft, torch.full((V, V), 1.0 / V), False)
    assert _chi_square_pvalue(counts, expected) < 1e-6
