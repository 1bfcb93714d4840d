"""The drafts the runner proposes equal what the head predicts when run as the trainer
evaluates it (engine/spec/train.py: the same taps, positions, tokens and mask rows,
densely over the whole sequence so far), with the step's bookkeeping on torch and on
its Triton kernels, at every step of a Qwen3-MoE target with a
2-layer head at K=7 (the device benchmark's shapes, tiny): with async scheduling and
the padded graph steps, through rejections and acceptances. Every propose call is
recorded with the known tokens it drafted after; the dense reference is computed from
that prefix alone."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.runner import spec_inputs
from engine.spec.checkpoint import load_head
from engine.spec.train import (
    target_features,
)
from tests.engine.kernels.cases import interpreted
from tests.engine.spec.helpers import dense_drafts, trained_head
from tests.engine.tiny_models import build

K = 7
MASK_ID = 255
LAYERS = [1, 2, 3]
PROMPTS = [list(range(40, 61)), [5, 17, 99, 3, 8], [7] * 9]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 4-layer tiny Qwen3-MoE target and a 2-layer head trained briefly on its greedy
    text (so rounds accept some drafts and reject others)."""
    root = tmp_path_factory.mktemp("parity")
    model = build("qwen3_moe", root / "target", num_hidden_layers=4)
    return root / "target", model, trained_head(model, root / "head", LAYERS, MASK_ID, depths=K, steps=40,
                                                 num_layers=2)


def _record_proposals(llm) -> list[tuple[list[int], list[int]]]:
    """(known tokens, the K drafts written after them) of every request at every
    propose call (CPU: the table is host memory, reading it is no synchronisation)."""
    runner = llm.engine.runner
    spec, t = runner.spec, runner.table
    propose, seen = spec.propose, []

    def recording(table, rows, nsched, n_rows_cpu, ndraft, samples, *args, **kwargs):
        propose(table, rows, nsched, n_rows_cpu, ndraft, samples, *args, **kwargs)
        for row, s in zip(rows.tolist(), samples.tolist()):
            if s and row != t.pad_row:
                n = int(t.num_tokens[row])
                seen.append((t.token_ids[row, :n].tolist(), t.token_ids[row, n:n + K].tolist()))
    spec.propose = recording
    return seen


def chain_drafts(head, known: list[int], aux: torch.Tensor) -> list[int]:
    """EAGLE's chain drafter, densely: context rows 0..n-2 (token x_{i+1}, fc of the taps
    at i), then row n-2+j holds d_j and the pre-norm hidden state of row n-3+j."""
    n = len(known)
    ids = torch.tensor(known[1:])
    hidden = head.fc(aux[:n - 1])
    drafts = []
    with torch.no_grad():
        for _ in range(K):
            T = ids.shape[0]
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            normed, pre = head(ids, None, torch.arange(T), torch.zeros(T, dtype=torch.bool), mask, hidden=hidden)
            drafts.append(int(head.to_target_ids(head.compute_logits(normed[-1:]).argmax(-1))[0]))
            ids = torch.cat([ids, torch.tensor(drafts[-1:])])
            hidden = torch.cat([hidden, pre[-1:]])
    return drafts


def _generate(folder, head_dir, parallel: bool = True, graphs: bool = False, **args):
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=32, max_model_len=96,
              speculative_config={"method": "peagle", "model": str(head_dir), "num_speculative_tokens": K,
                                  "parallel_drafting": parallel}, **args)
    if graphs:
        llm.engine.runner.capture_cuda_graphs(sizes=[1, 2, 4], eager=True)
    seen = _record_proposals(llm)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (24, 30, 18)]
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    return llm, outs, seen


def _bookkeeping_kernels(monkeypatch) -> None:
    """The step's bookkeeping (engine/runner/spec_inputs.py) through its Triton kernels,
    interpreted; the model's own ops stay on torch (fast)."""
    monkeypatch.setattr(spec_inputs, "use_triton", lambda t, backend=None: True)


@pytest.mark.parametrize("async_scheduling,graphs,kernels", [
    (False, False, False), (True, True, False), pytest.param(True, True, True, marks=interpreted)])
def test_runner_drafts_equal_the_trainers_view(pair, async_scheduling, graphs, kernels, monkeypatch):
    folder, model, head_dir = pair
    head = load_head(head_dir)
    if kernels:
        _bookkeeping_kernels(monkeypatch)
    llm, _, seen = _generate(folder, head_dir, graphs=graphs, async_scheduling=async_scheduling)
    assert len(seen) >= 20
    for known, drafts in seen:
        assert drafts == dense_drafts(head, model, known, K, MASK_ID, LAYERS), f"after {len(known)} tokens"
    st = llm.engine.spec_stats
    # Both branches of the layout ran: rounds that accepted drafts and rounds that did not.
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens


def test_chain_drafter_feeds_each_draft_back(pair):
    """parallel_drafting=False: d_1 from the [stale | valid] pass, then each d_{j+1} from
    a row holding d_j and the head's own pre-norm hidden state of d_j's row (EAGLE's
    chain), at its position (async scheduling, padded graph steps); the greedy output is
    still the target's."""
    folder, model, head_dir = pair
    head = load_head(head_dir)
    _, base, _ = _generate(folder, head_dir)
    _, outs, seen = _generate(folder, head_dir, parallel=False, graphs=True, async_scheduling=True)
    assert outs == base
    differ = 0
    for known, drafts in seen[:12]:
        seq = torch.tensor([known])
        aux, _ = target_features(model, seq, LAYERS)
        assert drafts == chain_drafts(head, known, aux[0]), f"after {len(known)} tokens"
        differ += drafts != dense_drafts(head, model, known, K, MASK_ID, LAYERS)
    assert differ > 0, "the chain drafter gave the parallel drafter's drafts"
