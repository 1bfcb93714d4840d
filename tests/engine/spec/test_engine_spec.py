"""P-EAGLE speculative decoding inside the engine (CPU, eager): greedy tokens equal the
target's own greedy tokens with any head (trained or not), through chunked prefill,
stops and preemption, with async scheduling off and on (one step in flight: the
scheduler counts the drafts in flight as accepted, the device's count corrects it a
step later); seeded sampling does not depend on the batch; the stats count drafted and
accepted tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.spec.checkpoint import save_head
from engine.spec.train import (
    init_from_target,
    new_head,
)
from tests.engine.spec.helpers import dense_drafts, trained_head
from tests.engine.tiny_models import CONFIGS

MASK_ID = 255
LAYERS = [1, 2, 3]
PROMPTS = [[5, 17, 99, 3], list(range(40, 61)), [7] * 9, list(range(100, 113)), [1, 2]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A 4-layer tiny Llama (three distinct layers to tap), saved for the engine."""
    path = tmp_path_factory.mktemp("target")
    config = transformers.LlamaConfig(**dict(CONFIGS["llama"][2], num_hidden_layers=4))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = None
    model.save_pretrained(str(path))
    return path, model


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    """(untrained head folder, trained head folder): the trained one learned the target's
    own greedy continuations for 100 steps."""
    _, model = target
    root = tmp_path_factory.mktemp("heads")
    untrained = new_head(model.config, LAYERS, MASK_ID, depths=4)
    init_from_target(untrained, model)
    save_head(untrained, root / "untrained")
    return root / "untrained", trained_head(model, root / "trained", LAYERS, MASK_ID, depths=4, steps=100,
                                            num_sequences=32)


def _params(stop_token: int | None = None) -> list[SamplingParams]:
    sp = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 17, 9, 1, 12)]
    if stop_token is not None:
        sp[4] = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_token])
    return sp


def _run(folder, prompts, params, head=None, k=3, speculative_config_extra=None, **args):
    spec = None if head is None else {"method": "peagle", "model": str(head), "num_speculative_tokens": k,
                                      **(speculative_config_extra or {})}
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=args.pop("budget", 16), speculative_config=spec,
              **args)
    outs = llm.generate(prompts, params)
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"
    return llm, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_with_a_trained_head_equals_greedy_without(target, heads, async_scheduling):
    folder, _ = target
    _, base = _run(folder, PROMPTS, _params())
    stop = base[4][0][5]       # a stop token met mid-way: drafts accepted past it are dropped
    _, base = _run(folder, PROMPTS, _params(stop))
    k = 3
    llm, spec = _run(folder, PROMPTS, _params(stop), head=heads[1], k=k, async_scheduling=async_scheduling)
    assert spec == base
    st = llm.engine.spec_stats
    assert st.num_drafts > 0 and st.num_draft_tokens <= k * st.num_drafts
    print(f"K={k}: acceptance length {st.mean_acceptance_length:.2f} over {st.num_drafts} rounds, "
          f"accepted per position {st.accepted_per_position}")
    # The trained head has learned the target's greedy text: it gets drafts accepted.
    assert st.num_accepted_tokens > 0
    # Again on the same engine: the prompts now hit the prefix cache (target and head KV
    # of the cached blocks are reused), same tokens.
    hits = llm.engine.kv.paged.pool.hits
    again = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, _params(stop))]
    assert llm.engine.kv.paged.pool.hits > hits and again == base
    assert base[4][1] == "stop" and base[4][0][-1] == stop


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_with_an_untrained_head_through_preemption(target, heads, async_scheduling):
    folder, _ = target
    prompts = [list(range(10, 30)), list(range(60, 75)), [9] * 11]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 16, 12)]
    _, base = _run(folder, prompts, params, budget=8)
    # 16 blocks of 4 tokens: three requests of up to 34 tokens (+ look-ahead) do not fit together.
    llm, spec = _run(folder, prompts, params, head=heads[0], k=4, budget=8, num_kv_blocks=16, max_model_len=64,
                     enable_prefix_caching=False, async_scheduling=async_scheduling)
    assert llm.engine.scheduler.num_preemptions > 0
    assert spec == base


def test_seeded_sampling_does_not_depend_on_the_batch(target, heads):
    folder, _ = target
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    _, alone = _run(folder, [PROMPTS[3]], [sp], head=heads[1])
    _, batched = _run(folder, PROMPTS, [greedy, greedy, greedy, sp, greedy], head=heads[1])
    _, pair = _run(folder, [PROMPTS[0], PROMPTS[3]], [greedy, sp], head=heads[1], k=3)
    # The same prompt and seed: the same tokens wherever the request sits in the batch.
    assert len(alone[0][0]) == 10
    assert batched[3] == alone[0] and pair[1] == alone[0]


def test_bad_speculative_configs_are_refused(target, heads):
    folder, _ = target
    for bad, words in [({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "method"),
                       ({"method": "peagle", "model": str(heads[0]), "num_speculative_tokens": 0}, "between"),
                       ({"method": "peagle", "num_speculative_tokens": 2}, "model"),
                       ({"method": "peagle", "model": str(heads[0]), "num_speculative_tokens": 3,
                         "num_speculative_tokens_per_batch": [[8, 2], [4, 1]]}, "increasing")]:
        with pytest.raises(ValueError, match=words):
            EngineConfig(speculative_config=bad)
    # The head was trained for 4 drafts; asking for more is refused at start-up.
    with pytest.raises(ValueError, match="trained to draft 4"):
        LLM(str(folder), speculative_config={"method": "peagle", "model": str(heads[0]), "num_speculative_tokens": 6})


def test_engine_drafts_equal_the_heads_dense_drafts(target, heads):
    """After every step, the K drafts the runner keeps past a request's known tokens are
    the head's drafts computed densely over the whole sequence so far (the trainer's
    causal view): the paged [stale | valid | mask] layout, the taps and the head's KV
    cache across steps (rejections included) lose nothing."""
    from engine.request import Request
    from engine.spec.checkpoint import load_head
    folder, model = target
    k = 3
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=8,
              speculative_config={"method": "peagle", "model": str(heads[1]), "num_speculative_tokens": k})
    head = load_head(heads[1])
    core = llm.engine
    core.add_request(Request("r", list(range(40, 53)), SamplingParams(max_tokens=9, temperature=0.0,
                                                                      ignore_eos=True), []))
    checked = 0
    while core.has_unfinished():
        core.step()
        req = core.scheduler.requests.get("r")
        if req is None or req.num_computed_tokens < req.num_prompt_tokens:
            continue
        t = core.runner.table
        row = t.rows["r"]
        n = req.num_tokens
        drafts = t.token_ids[row, n:n + k].tolist()
        want = dense_drafts(head, model, req.all_token_ids, k, MASK_ID, LAYERS)
        assert drafts == want, f"after {n} tokens"
        checked += 1
    assert checked >= 3


def test_the_heads_kv_comes_out_of_the_cache_budget(target, heads):
    folder, _ = target
    args = {"block_size": 4, "kv_cache_memory_gb": 0.002}
    plain = LLM(str(folder), **args).engine
    spec = LLM(str(folder), speculative_config={"method": "peagle", "model": str(heads[0]),
                                                "num_speculative_tokens": 2}, **args).engine
    # Target: 4 layers x K,V x 4 tokens x 2 heads x 16 x fp32 = 4096 bytes a block; the
    # head's one layer adds 1024.
    assert plain.num_blocks == int(0.002 * 2**30 // 4096)
    assert spec.num_blocks == int(0.002 * 2**30 // 5120)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_spec_graph_steps_give_the_eager_tokens(target, heads, async_scheduling):
    """The spec graphs' padded steps (K + 1 query tokens per request, pad entries on the
    table's pad row with K drafts nothing reads), run eagerly on the CPU: the same
    tokens, the pad row untouched, no block leaked."""
    folder, _ = target
    _, base = _run(folder, PROMPTS, _params())
    k = 3
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=16, async_scheduling=async_scheduling,
              speculative_config={"method": "peagle", "model": str(heads[1]), "num_speculative_tokens": k})
    runner = llm.engine.runner
    runner.capture_cuda_graphs(sizes=[2, 4, 8], eager=True)
    launched = []
    launch = runner.graphs._launch
    runner.graphs._launch = lambda size, seq_lens: launched.append(size) or launch(size, seq_lens)
    outs = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, _params())]
    assert outs == base
    assert launched and set(launched) <= {2, 4, 8}
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    pad = runner.table.pad_row
    assert int(runner.table.num_computed[pad]) == 0 and int(runner.table.num_tokens[pad]) == 0
    assert not runner.table.token_ids[pad].any()
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_chain_drafting_keeps_the_greedy_tokens(target, heads):
    """parallel_drafting=False (EAGLE's chain drafter, K passes of the head: its drafts
    are checked in test_draft_parity.py): the greedy tokens are the target's own."""
    folder, _ = target
    _, base = _run(folder, PROMPTS, _params())
    llm, chain = _run(folder, PROMPTS, _params(), head=heads[1], k=3,
                      speculative_config_extra={"parallel_drafting": False})
    assert chain == base
    assert llm.engine.spec_stats.num_drafts > 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logprobs_with_speculation_equal_logprobs_without(target, heads, async_scheduling):
    """Every emitted token, accepted draft or not, gets the target's logprob at its
    position (and the top-n there), and prompt logprobs come from the same forward: the
    same entries as without speculation (float32, within 1e-4)."""
    folder, _ = target
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2,
                             prompt_logprobs=1 if i == 1 else None) for i, n in enumerate((6, 11, 9))]
    outs = []
    for head in (None, heads[1]):
        spec = None if head is None else {"method": "peagle", "model": str(head), "num_speculative_tokens": 3}
        llm = LLM(str(folder), block_size=4, max_num_batched_tokens=16, speculative_config=spec,
                  async_scheduling=async_scheduling)
        outs.append(llm.generate(PROMPTS[:3], params))
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert outs[1][1].prompt_logprobs is not None and len(outs[1][1].prompt_logprobs) == len(PROMPTS[1])
    for plain, spec in zip(*outs):
        a, b = plain.outputs[0], spec.outputs[0]
        assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[k] - lb[k]) < 1e-4 for k in la)
        assert (plain.prompt_logprobs is None) == (spec.prompt_logprobs is None)
        for la, lb in zip(plain.prompt_logprobs or [], spec.prompt_logprobs or []):
            assert (la is None) == (lb is None)
            assert la is None or (la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-4 for k in la))


def _oracle_drafts(llm, sequences: list[list[int]], k: int) -> None:
    """Make the runner's drafter propose each request's true next tokens (from a run
    without speculation), so every round accepts drafts and the rows past the first
    decide the output: a test oracle in place of the head's drafts."""
    runner = llm.engine.runner
    spec, t = runner.spec, runner.table
    propose = spec.propose

    def oracle(*args, **kwargs):
        propose(*args, **kwargs)
        for row in t.rows.values():
            n = int(t.num_tokens[row])
            for full in sequences:
                m = min(n, len(full))
                if t.token_ids[row, :m].tolist() == full[:m]:
                    nxt = full[n:n + k]
                    t.token_ids[row, n:n + len(nxt)] = torch.tensor(nxt, dtype=t.token_ids.dtype)
                    break
    spec.propose = oracle


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_penalties_and_bias_with_speculation_equal_without(target, heads, async_scheduling):
    """Verification row j of a request sees its generated tokens plus drafts d_1..d_j:
    greedy output with presence, frequency and repetition penalties and a logit bias is
    the same with speculation as without. The drafts are the true next tokens, so most
    rounds accept several and rows past the first matter."""
    folder, _ = target
    params = [SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.5,
                             frequency_penalty=1.0, logit_bias={7: 2.0, 9: -1.0}),
              SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, frequency_penalty=2.0)]
    prompts = PROMPTS[1:4]
    plain = [o.outputs[0].token_ids for o in LLM(str(folder), block_size=4).generate(prompts, params)]
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=16, async_scheduling=async_scheduling,
              speculative_config={"method": "peagle", "model": str(heads[1]), "num_speculative_tokens": 3})
    _oracle_drafts(llm, [p + o for p, o in zip(prompts, plain)], 3)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == plain
    st = llm.engine.spec_stats
    assert st.accepted_per_position[2] > 0.5 * st.num_drafts


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_drafts_shrink_as_the_batch_grows(target, heads, async_scheduling):
    """num_speculative_tokens_per_batch [[3, 2], [5, 1]] with K=3: five requests finishing
    one by one cross both thresholds. Each step verifies at most the rule's k for its
    running batch, the padded graph steps of every k (run eagerly) replay, and the greedy
    tokens equal the target's own; nothing stays pending and no block leaks."""
    folder, _ = target
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 30, 9, 2, 12)]
    _, base = _run(folder, PROMPTS, params)
    rule = [[3, 2], [5, 1]]
    llm = LLM(str(folder), block_size=4, max_num_batched_tokens=40, async_scheduling=async_scheduling,
              speculative_config={"method": "peagle", "model": str(heads[1]), "num_speculative_tokens": 3,
                                  "num_speculative_tokens_per_batch": rule})
    runner, sched = llm.engine.runner, llm.engine.scheduler
    runner.capture_cuda_graphs(sizes=[2, 4, 8], eager=True)
    assert sorted(runner.spec_graphs) == [1, 2, 3]
    launched = []
    for k, graphs in runner.spec_graphs.items():
        launch = graphs._launch
        graphs._launch = lambda size, seq_lens, k=k, launch=launch: launched.append(k) or launch(size, seq_lens)
    steps = []
    schedule = sched.schedule

    def recording():
        running = len(sched.running)
        out = schedule()
        steps.append((running, max(out.spec_token_counts.values(), default=0)))
        return out

    sched.schedule = recording
    outs = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, params)]
    assert outs == base
    allowed = {1: 3, 2: 3, 3: 2, 4: 2, 5: 1}
    assert all(k <= allowed[n] for n, k in steps if n), steps
    assert {k for _, k in steps} >= {1, 2, 3}, steps
    assert set(launched) >= {1, 3}, (launched, steps)
    pad = runner.table.pad_row
    assert int(runner.table.num_computed[pad]) == 0 and not runner.table.token_ids[pad].any()
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert not sched.pending and llm.engine.kv.num_free_blocks == llm.engine.num_blocks
