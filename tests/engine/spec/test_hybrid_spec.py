"""P-EAGLE on a hybrid (Mamba-2) target: a tiny NemotronH with a head trained briefly on
its greedy text. Verification keeps each drafting request's Mamba state after every
verified token and puts the accepted one in its slot (engine/layers/mamba_spec.py), so
greedy tokens with speculation equal those without, token for token, at batch 1 and 3,
sync and async scheduling, through mixed steps (prompt chunks beside verifications)
and both accepted and rejected drafts; every block and state slot is freed."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.ops import mamba as mamba_ops
from engine.runner import model_runner
from tests.engine.kernels.cases import interpreted
from tests.engine.spec.helpers import trained_head
from tests.engine.test_nemotron_h import _FailingHook
from tests.engine.tiny_models import build

K = 3
MASK_ID = 255
LAYERS = [1, 3, 4]          # taps on an MoE, an MoE and a Mamba layer's input ("ME*EM-E")
PROMPTS = [list(range(40, 61)), [5, 17, 99, 3], [7] * 9]
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 17, 9)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_spec")
    model = build("nemotron_h_nano", root / "target")
    model.config.rms_norm_eps = model.config.layer_norm_epsilon     # the head's norms
    return root / "target", trained_head(model, root / "head", LAYERS, MASK_ID, depths=K, steps=60)


def _generate(folder, prompts, params, head=None, **args):
    spec = None if head is None else {"method": "peagle", "model": str(head), "num_speculative_tokens": K}
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=12, speculative_config=spec, **args)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    kv = llm.engine.kv
    assert kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"
    assert kv.groups[1].pool.num_free == llm.config.max_num_seqs, "state slots leaked"
    return llm, outs


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_with_speculation_equals_greedy_without(pair, batch, monkeypatch):
    folder, head = pair
    prompts, params = PROMPTS[:batch], PARAMS[:batch]
    mixed = []      # verification steps that also ran the chunked path (a prompt chunk beside drafts)
    build_steps = model_runner.verify_steps
    monkeypatch.setattr(model_runner, "verify_steps", lambda *a: mixed.append(a[-1]) or build_steps(*a))
    _, base = _generate(folder, prompts, params)
    for async_scheduling in (False, True):
        llm, spec = _generate(folder, prompts, params, head=head, async_scheduling=async_scheduling)
        assert spec == base, f"async_scheduling={async_scheduling}"
        st = llm.engine.spec_stats
        # Both kinds of rounds happen: accepted drafts (the state after a draft is kept)
        # and rejected ones (the slot must skip the states past the correction).
        assert 0 < st.num_accepted_tokens < st.num_draft_tokens, (st.num_accepted_tokens, st.num_draft_tokens)
    assert any(mixed) == (batch > 1)


@interpreted
def test_the_mamba_kernels_verify_as_the_references_do(pair, monkeypatch):
    """The verification path through the Mamba ops' Triton kernels (interpreted): the
    chunked kernels with drafting requests on the scratch slot, the single-token ones
    on the per-step state copies; the model's other ops stay on torch."""
    folder, head = pair
    monkeypatch.setattr(mamba_ops, "use_triton", lambda t, backend=None: True)
    _, base = _generate(folder, PROMPTS, PARAMS)
    llm, spec = _generate(folder, PROMPTS, PARAMS, head=head, async_scheduling=True)
    assert spec == base
    assert llm.engine.spec_stats.num_accepted_tokens > 0


def test_graphs_stay_off_and_kv_transfer_is_refused(pair):
    """Not yet for a hybrid spec target: CUDA graphs (decode steps run eagerly) and the
    pd hand-off (refused when a connector is plugged in, saying what to change)."""
    folder, head = pair
    llm = LLM(str(folder), block_size=4, speculative_config={"method": "peagle", "model": str(head),
                                                             "num_speculative_tokens": K})
    llm.engine.runner.capture_cuda_graphs(sizes=[2, 4], eager=True)
    assert llm.engine.runner.graphs is None and not llm.engine.runner.spec_graphs
    with pytest.raises(ValueError, match="drop speculative_config"):
        llm.engine.set_kv_transfer(_FailingHook())
    assert llm.engine.scheduler.kv_transfer is None


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_gpu_greedy_with_speculation_equals_greedy_without(pair, async_scheduling):
    """On the device, every Mamba op through its kernel: the same greedy tokens as the
    plain engine (which replays its decode graphs), drafts accepted and rejected."""
    folder, head = pair
    args = {"device": "cuda", "dtype": "float32", "block_size": 4, "max_num_batched_tokens": 12, "max_num_seqs": 8}
    base = [o.outputs[0].token_ids for o in LLM(str(folder), **args).generate(PROMPTS, PARAMS)]
    llm = LLM(str(folder), async_scheduling=async_scheduling, **args,
              speculative_config={"method": "peagle", "model": str(head), "num_speculative_tokens": K})
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == base
    st = llm.engine.spec_stats
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens
