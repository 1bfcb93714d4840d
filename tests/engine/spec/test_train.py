"""The trainer: its rows and mask are what inference sees, and a head trained for a
few hundred steps on a tiny random Llama target's greedy text is accepted far more
often than an untrained one, and loads with the checkpoint loader."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.kernels import kernel_backend
from engine.spec.checkpoint import load_head, save_head
from engine.spec.train import (
    TrainConfig,
    acceptance_length,
    batch_rows,
    build_rows,
    chain_counts,
    generate_greedy,
    init_from_target,
    loss_fn,
    main,
    new_head,
    sample_chains,
    target_features,
    train_head,
    training_mask,
)
from tests.engine.spec.helpers import block_causal_mask, random_head

V, MASK, LAYERS, K = 48, 47, [1, 2, 3], 3


def test_chains_are_nested_and_labelled():
    anchor, depth = sample_chains(3, 20, 4, 0.7, 0.2, torch.Generator().manual_seed(0))
    for b in range(3):
        a, d_ = anchor[b], depth[b]
        assert (a[d_ == 0] == torch.arange(19)).all()
        for d in range(1, 4):
            deeper = set(a[d_ == d].tolist())
            assert deeper <= set(a[d_ == d - 1].tolist())             # chains never skip a depth
            assert max(deeper) + d + 1 <= 19                           # label row exists
            assert len(deeper) == -(-max(0.7 ** d, 0.2) * (19 - d) // 1)
    assert not torch.equal(anchor[0], anchor[1])                       # each sequence draws its own
    # ratio 1: every anchor at every depth; at the floor, each depth keeps fewer than the last.
    anchor, depth = sample_chains(1, 10, 3, 1.0, 1.0)
    assert [int((depth == d).sum()) for d in range(3)] == [9, 8, 7]
    assert chain_counts(40, 8, 0.7, 0.2) == [39, 27, 19, 13, 9, 7, 6, 5]


def test_rows_are_shifted_by_one_and_deeper_rows_are_masked():
    N = 8
    tokens = torch.arange(N)[None] + 10
    aux = torch.arange(N).float()[None, :, None].expand(1, N, 6)
    logits = torch.arange(N).float()[None, :, None].expand(1, N, 5)
    rows = build_rows(tokens, aux, logits, 99, TrainConfig(depths=3), None, ratio=1.0)
    for i in range(rows.depth.numel()):
        d, pos = int(rows.depth[i]), int(rows.positions[i])
        j = pos - d                                               # the anchor
        assert int(rows.aux[i, 0]) == j                           # taps of the anchor (depth 0 uses them)
        assert int(rows.target_logits[i, 0]) == pos + 1           # learns the target at position + 1
        assert int(rows.input_ids[i]) == (j + 11 if d == 0 else 99)   # x_{j+1}, or the mask token
        assert bool(rows.is_mask[i]) == (d > 0)


def test_training_view_equals_inference_view():
    """The head's output for chain (j, d) under the training mask equals a causal pass
    over [context rows 0..j-1 | NTP at j | K-1 MTP rows], the runner's layout."""
    head = random_head(1, vocab_size=V, draft_vocab_size=V, mask_token_id=MASK)
    N = 9
    g = torch.Generator().manual_seed(0)
    tokens, aux = torch.randint(0, V - 1, (1, N), generator=g), torch.randn(1, N, 72, generator=g)
    rows = build_rows(tokens, aux, torch.zeros(1, N, V), MASK, TrainConfig(depths=K), None, ratio=1.0)
    assert torch.equal(rows.mask, training_mask(rows.positions - rows.depth, rows.depth))
    normed, _ = head(rows.input_ids, rows.aux, rows.positions, rows.is_mask, rows.mask)
    train_ids = head.compute_logits(normed).argmax(-1)
    for j in (0, 3, N - 1 - K):
        ids = torch.cat([tokens[0, 1:j + 2], torch.zeros(K - 1, dtype=torch.long)])
        a = torch.cat([aux[0, :j + 1], torch.zeros(K - 1, 72)])
        n = j + K
        out = head.propose(a, ids, torch.arange(n), torch.tensor([0, n]), block_causal_mask([n]), K)
        anchor = rows.positions - rows.depth
        want = [int(train_ids[(anchor == j) & (rows.depth == d)]) for d in range(K)]
        assert out.draft_ids[0].tolist() == want


def test_every_parameter_learns_whatever_kernels_serve():
    """Training runs the head on torch ops even where the engine serves with Triton
    kernels (they have no backward: on a GPU only the LM head used to learn)."""
    head = random_head(2, vocab_size=V, draft_vocab_size=V, mask_token_id=MASK).train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    tokens, aux, logits = torch.randint(0, V - 1, (3, 12), generator=g), torch.randn(3, 12, 72), torch.randn(3, 12, V)
    rows = batch_rows(tokens, aux, logits, MASK, K, 0.7, 0.2, g)
    assert rows.input_ids.shape == (3, sum(rows.counts)) and rows.mask.shape == (3, sum(rows.counts), sum(rows.counts))
    with kernel_backend("triton"):
        loss, top1 = loss_fn(head, rows)
    loss.backward()
    assert top1.shape == (K,)
    assert [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_features_kept_in_bf16_train_a_float32_head(target_and_data):
    """The device script keeps the target's taps and logits in bf16 on the GPU; the
    trainer and the acceptance measure widen each batch to the head's float32."""
    target, tokens, aux, logits = target_and_data
    head = new_head(target.config, LAYERS, MASK, depths=K)
    init_from_target(head, target)
    aux16, logits16 = aux[:8].bfloat16(), logits[:8].bfloat16()
    log = train_head(head, tokens[:8], aux16, logits16, TrainConfig(depths=K, steps=4, batch_size=2, sync_every=2))
    assert log.steps == 4 and all(x == x for x in log.losses)     # finite losses
    al, per_position = acceptance_length(head, tokens[:4], aux16[:4], logits16[:4], K, 1)
    assert 1.0 <= al <= K + 1 and per_position.shape == (K,)


@pytest.fixture(scope="module")
def target_and_data():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    target = LlamaForCausalLM(cfg).eval()
    prompts = torch.randint(0, V - 1, (64, 3), generator=torch.Generator().manual_seed(0))
    tokens = generate_greedy(target, prompts, 17, banned=[MASK])
    aux, logits = target_features(target, tokens, LAYERS)
    return target, tokens, aux, logits


def test_trained_head_is_accepted_far_more_often_and_loads(target_and_data, tmp_path):
    target, tokens, aux, logits = target_and_data
    assert not (tokens == MASK).any()
    train, held_out = slice(0, 48), slice(48, 64)
    head = new_head(target.config, LAYERS, MASK, depths=K)
    init_from_target(head, target)
    # Measured on held-out sequences from their first generated token on (prompt 3).
    before, _ = acceptance_length(head, tokens[held_out], aux[held_out], logits[held_out], K, first_anchor=1)
    log = train_head(head, tokens[train], aux[train], logits[train],
                     TrainConfig(depths=K, steps=300, batch_size=4, lr=3e-3, sync_every=10))
    after, per_position = acceptance_length(head, tokens[held_out], aux[held_out], logits[held_out], K, 1)
    assert log.steps == 300 and len(log.losses) == 30 and log.losses[-1] < log.losses[0]
    print(f"acceptance length at K={K}: untrained {before:.2f}, trained {after:.2f}; per position {per_position.tolist()}")
    assert before < 1.2 and after > before + 0.8, (before, after, per_position)
    assert per_position[0] > 0.5

    path = save_head(head, tmp_path / "head", "speculators", verifier="tiny-llama",
                     extra_config={"tandem_training": {"steps": 300}})
    loaded = load_head(path)
    assert json.loads((path / "config.json").read_text())["speculators_model_type"] == "peagle"
    assert loaded.cfg.aux_layer_ids == LAYERS and loaded.cfg.num_speculative_tokens == K
    again, _ = acceptance_length(loaded, tokens[held_out], aux[held_out], logits[held_out], K, 1)
    assert again == after


def test_cli_writes_a_loadable_head(target_and_data, tmp_path):
    target = target_and_data[0]
    target.save_pretrained(tmp_path / "target")
    main(["--target", str(tmp_path / "target"), "--out", str(tmp_path / "head"), "--mask-token-id", str(MASK),
          "--layers", "1", "2", "3", "--sequences", "4", "--prompt-len", "3", "--new-tokens", "6",
          "--steps", "3", "--depths", "2"])
    head = load_head(tmp_path / "head")
    assert head.cfg.num_speculative_tokens == 2 and head.cfg.mask_token_id == MASK
    assert json.loads((tmp_path / "head" / "config.json").read_text())["tandem_training"]["steps"] == 3
