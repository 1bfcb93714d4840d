"""P-EAGLE on the decode side of a KV hand-off (real NIXL, DRAM): the decode engine's
first step after the hand-off recomputes the last prompt position with the producer's
first token (no drafts to verify yet; its taps start the head's context), then drafts
as usual. Greedy answers equal one colocated engine's without speculation, and both
block pools return to full."""

from __future__ import annotations

import pytest

from engine.request import Request
from tests.disagg.handoff import decode, greedy, make_core, pool_is_full, prefill, run_to_end, settle
from tests.disagg.test_kv_handoff import prompt_of

PAD_ID = 258      # the default tokenizer's <|pad|>: the head's mask token


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from transformers import AutoConfig

    from engine.default_model import default_model_path
    from engine.spec.checkpoint import save_head
    from engine.spec.train import new_head
    head = save_head(new_head(AutoConfig.from_pretrained(str(default_model_path())), None, PAD_ID, depths=3),
                     tmp_path_factory.mktemp("head"))
    spec = {"method": "peagle", "model": str(head), "num_speculative_tokens": 3}
    ref = make_core(connector=False)
    p, d = make_core(), make_core(speculative_config=spec)
    yield ref, p, d
    for core in (p, d):
        core.scheduler.kv_transfer.close()


@pytest.mark.parametrize("n", [1, 16, 17, 40])
def test_spec_decode_after_handoff_equals_colocated(engines, n):
    ref, p, d = engines
    prompt = prompt_of(n, salt=5)
    ref.add_request(Request(f"ref-{n}", prompt, greedy(12)))
    want = run_to_end(ref, f"ref-{n}")[0]
    drafts_before = d.spec_stats.num_drafts
    steps = []
    execute = d.runner.execute
    d.runner.execute = lambda so: steps.append((dict(so.num_scheduled_tokens), dict(so.spec_token_counts))) or \
        execute(so)
    first, params = prefill(p, f"r-{n}", prompt)
    try:
        tokens, out = decode(d, p, f"r-{n}", prompt, first, params.handle, 12)
    finally:
        d.runner.execute = execute
    assert out.error is None, out.error
    assert tokens == want
    scheduled = [(s[f"r-{n}"], k.get(f"r-{n}", 0)) for s, k in steps if f"r-{n}" in s]
    assert scheduled[0] == (2, 0)       # last prompt position + the first token, no drafts
    assert all(k > 0 for _, k in scheduled[1:-1])
    assert d.spec_stats.num_drafts > drafts_before        # the decode side drafted
    settle(p, d)
    assert pool_is_full(p) and pool_is_full(d)
